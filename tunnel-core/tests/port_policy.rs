//! The server's port policy over both transports: told at registration to every agent, and
//! every change to agents that announced they understand it; an agent that did not (an older
//! one) keeps its link and never sees a message it would take for a protocol violation.

mod common;

use std::time::Duration;

use tokio::sync::watch;
use tunnel_core::{
    AgentSession, LinkState, Listener, ListenerConfig, PortPolicy, PortSet, ServerSession,
    TransportChoice, proto,
};

fn policy(node: &[u16]) -> PortPolicy {
    PortPolicy {
        node: PortSet::new(node.iter().copied()),
        loopback: PortSet::new([10250, 10255]),
    }
}

/// A listener telling `policy`, and two agents over `choice`: one that announces the
/// capability, one that does not.
async fn agents(
    choice: TransportChoice,
    policy: watch::Receiver<PortPolicy>,
) -> (Listener, Vec<ServerSession>, AgentSession, AgentSession) {
    let config = ListenerConfig {
        port_policy: Some(policy),
        ..ListenerConfig::default()
    };
    let (mut listener, connector) = common::endpoints(config, choice).await;
    let addr = listener.local_addr();
    let mut sessions = Vec::new();
    let mut servers = Vec::new();
    for capabilities in [vec![proto::Capability::PortPolicy.into()], vec![]] {
        let register = proto::Register {
            capabilities,
            ..Default::default()
        };
        let (agent, server) = tokio::join!(
            connector.connect(addr, "localhost", register),
            listener.accept()
        );
        servers.push(server.unwrap().unwrap());
        sessions.push(agent.unwrap());
    }
    let old = sessions.pop().unwrap();
    let new = sessions.pop().unwrap();
    (listener, servers, new, old)
}

async fn the_policy_reaches_the_agents_that_understand_it(choice: TransportChoice) {
    let (tx, rx) = watch::channel(policy(&[9100]));
    let (_listener, _servers, new, old) = agents(choice, rx).await;
    // At registration, both hear the policy in force (an older agent ignores the field).
    assert_eq!(
        new.port_policy().borrow().as_deref(),
        Some(&policy(&[9100]))
    );
    assert_eq!(
        old.port_policy().borrow().as_deref(),
        Some(&policy(&[9100]))
    );

    let mut heard = new.port_policy();
    tx.send_replace(policy(&[9100, 9051]));
    tokio::time::timeout(
        Duration::from_secs(5),
        heard.wait_for(|p| p.as_deref() == Some(&policy(&[9051, 9100]))),
    )
    .await
    .expect("the change reaches the agent")
    .unwrap();

    // The older agent: no message it does not know, its link stays up, its policy is the one
    // it registered with.
    tx.send_replace(policy(&[9100, 9051, 9052]));
    let mut heard = new.port_policy();
    tokio::time::timeout(
        Duration::from_secs(5),
        heard.wait_for(|p| p.as_ref().is_some_and(|p| p.node.contains(9052))),
    )
    .await
    .expect("the second change reaches the agent")
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        matches!(old.state(), LinkState::Active),
        "{:?}",
        old.state()
    );
    assert_eq!(
        old.port_policy().borrow().as_deref(),
        Some(&policy(&[9100]))
    );
}

#[tokio::test]
async fn quic_the_policy_reaches_the_agents_that_understand_it() {
    the_policy_reaches_the_agents_that_understand_it(TransportChoice::Quic).await;
}

#[tokio::test]
async fn grpc_the_policy_reaches_the_agents_that_understand_it() {
    the_policy_reaches_the_agents_that_understand_it(TransportChoice::Grpc).await;
}

#[tokio::test]
async fn without_a_policy_the_agent_hears_none() {
    let (mut listener, connector) =
        common::endpoints(ListenerConfig::default(), TransportChoice::Quic).await;
    let register = proto::Register {
        capabilities: vec![proto::Capability::PortPolicy.into()],
        ..Default::default()
    };
    let (agent, server) = tokio::join!(
        connector.connect(listener.local_addr(), "localhost", register),
        listener.accept()
    );
    let _server = server.unwrap().unwrap();
    assert_eq!(agent.unwrap().port_policy().borrow().as_deref(), None);
}
