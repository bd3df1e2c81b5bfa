//! Plain TCP targets behind an agent: a source that sends as many bytes as asked, and an
//! address whose connects hang (a full accept queue), for tests and the load harness.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// Each connection sends an 8-byte big-endian count; the source answers with that many bytes
/// of [`crate::client::pattern`] (seed 0) and closes. Bytes written are counted per connection,
/// in accept order, so a test can see a reader that stopped.
#[derive(Debug)]
pub struct Source {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    written: Arc<Mutex<Vec<Arc<AtomicU64>>>>,
    task: JoinHandle<()>,
}

/// Bytes the source writes per call.
const CHUNK: usize = 64 * 1024;

impl Source {
    /// Starts a source on 127.0.0.1, port from the kernel.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let written: Arc<Mutex<Vec<Arc<AtomicU64>>>> = Arc::default();
        let counters = written.clone();
        let task = tokio::spawn(async move {
            let chunk: Arc<[u8]> = crate::client::pattern(CHUNK, 0).into();
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        let counter = Arc::new(AtomicU64::new(0));
                        counters.lock().expect("counters").push(counter.clone());
                        conns.spawn(serve(tcp, chunk.clone(), counter));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Self {
            addr,
            written,
            task,
        })
    }

    /// Bytes written so far on the `n`th connection accepted (0 before it exists).
    pub fn written(&self, n: usize) -> u64 {
        self.written
            .lock()
            .expect("counters")
            .get(n)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.written.lock().expect("counters").len()
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut tcp: TcpStream, chunk: Arc<[u8]>, written: Arc<AtomicU64>) {
    let _ = tcp.set_nodelay(true);
    let Ok(mut left) = tcp.read_u64().await else {
        return;
    };
    while left > 0 {
        let n = usize::try_from(left).map_or(chunk.len(), |l| l.min(chunk.len()));
        if tcp.write_all(&chunk[..n]).await.is_err() {
            return;
        }
        written.fetch_add(n as u64, Ordering::Relaxed);
        left -= n as u64;
    }
    let _ = tcp.shutdown().await;
}

/// Asks a [`Source`] (through whatever `io` leads to it) for `len` bytes and reads them all;
/// returns how many arrived before the end of the stream.
pub async fn fetch<IO>(io: &mut IO, len: u64) -> std::io::Result<u64>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    io.write_u64(len).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        match io.read(&mut buf).await? {
            0 => return Ok(got),
            n => got += n as u64,
        }
    }
}

/// An address whose connects hang: a listener with a full accept queue drops new SYNs, so a
/// dial there waits until the dialer gives up. Holds its listener and the connection that
/// fills the queue.
#[derive(Debug)]
pub struct Blackhole {
    /// The address (127.0.0.1).
    pub addr: SocketAddr,
    _listener: TcpListener,
    _filler: TcpStream,
}

impl Blackhole {
    /// Binds 127.0.0.1 with a backlog of zero and fills it with one connection.
    pub async fn start() -> std::io::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse().expect("address"))?;
        // Linux accepts one queued connection at backlog 0; every later SYN is dropped.
        let listener = socket.listen(0)?;
        let addr = listener.local_addr()?;
        let filler = TcpStream::connect(addr).await?;
        Ok(Self {
            addr,
            _listener: listener,
            _filler: filler,
        })
    }
}
