//! What every link does the same over both transports, through the library's front door
//! ([`Listener`], [`Connector`]): close causes and go-aways reach the other side typed, with who
//! decided them; a stream that asks for what the link has not negotiated is refused as such.

mod common;

use std::time::Duration;

use tunnel_core::{
    AgentSession, CloseCause, Initiator, LinkState, Listener, ListenerConfig, OpenError,
    OpenRequest, Refusal, ServerSession, SessionError, Target, TargetHost, TransportChoice, proto,
};

/// A listener and one agent connected over `choice`.
async fn pair(choice: TransportChoice) -> (Listener, ServerSession, AgentSession) {
    let (mut listener, connector) = common::endpoints(ListenerConfig::default(), choice).await;
    let addr = listener.local_addr();
    let (agent, server) = tokio::join!(
        connector.connect(addr, "localhost", proto::Register::default()),
        listener.accept()
    );
    let server = server.unwrap().unwrap();
    assert_eq!(server.identity().node_name, "node-a");
    (listener, server, agent.unwrap())
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what} within 10 s"))
}

async fn close_causes_reach_the_other_side(choice: TransportChoice) {
    // The server closes: both sides name the cause; each says who decided.
    let (_listener, server, agent) = pair(choice).await;
    server.close(CloseCause::Replaced);
    let heard = within("agent hears the close", agent.closed()).await;
    assert_eq!(
        (heard.cause, heard.initiator),
        (CloseCause::Replaced, Initiator::Remote),
        "{heard}"
    );
    let said = within("server's link ends", server.closed()).await;
    assert_eq!(
        (said.cause, said.initiator),
        (CloseCause::Replaced, Initiator::Local),
        "{said}"
    );
    // An open on the closed link fails with the link's reason, not a string.
    let target = Target {
        host: TargetHost::Loopback,
        port: 10250,
    };
    match server.open(&OpenRequest::new(target, 1)).await {
        Err(OpenError::LinkClosed(reason)) => assert_eq!(reason.cause, CloseCause::Replaced),
        other => panic!("expected a closed link, got {other:?}"),
    }

    // The agent closes and lets go of its handle at once, as a process on its way out does:
    // the close still reaches the server with its cause.
    let (_listener, server, agent) = pair(choice).await;
    agent.close(CloseCause::Shutdown);
    drop(agent);
    let heard = within("server hears the close", server.closed()).await;
    assert_eq!(
        (heard.cause, heard.initiator),
        (CloseCause::Shutdown, Initiator::Remote),
        "{heard}"
    );
}

async fn go_away_carries_its_cause(choice: TransportChoice) {
    let (_listener, server, agent) = pair(choice).await;
    server.go_away(CloseCause::Shutdown, Duration::from_secs(5));
    match within("agent hears the go-away", agent.draining()).await {
        LinkState::Draining(reason) => {
            assert_eq!(
                (reason.cause, reason.initiator),
                (CloseCause::Shutdown, Initiator::Remote),
                "{reason}"
            );
        }
        other => panic!("expected draining, got {other:?}"),
    }
    assert!(matches!(server.state(), LinkState::Draining(r) if r.initiator == Initiator::Local));
}

async fn compression_is_refused_until_negotiated(choice: TransportChoice) {
    let (_listener, server, agent) = pair(choice).await;
    let serve = tokio::spawn(async move {
        let incoming = agent.accept().await.unwrap();
        let refused = incoming.read_request().await;
        assert!(
            matches!(refused, Err(SessionError::Unsupported(_))),
            "{refused:?}"
        );
        agent
    });
    let mut request = OpenRequest::new(
        Target {
            host: TargetHost::Loopback,
            port: 10250,
        },
        1,
    );
    request.compress = true;
    match within("the agent answers", server.open(&request)).await {
        Err(OpenError::Refused { refusal, .. }) => assert_eq!(refusal, Refusal::Unsupported),
        other => panic!("expected an unsupported refusal, got {other:?}"),
    }
    let _agent = serve.await.unwrap();
    // The refusal is a stream's, not the link's.
    assert!(matches!(server.state(), LinkState::Active));
}

macro_rules! both_transports {
    ($($name:ident),* $(,)?) => {
        mod quic {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(tunnel_core::TransportChoice::Quic).await;
                }
            )*
        }
        mod grpc {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(tunnel_core::TransportChoice::Grpc).await;
                }
            )*
        }
    };
}

both_transports!(
    close_causes_reach_the_other_side,
    go_away_carries_its_cause,
    compression_is_refused_until_negotiated
);
