//! The protobuf codec of the gRPC transport, with buffers sized for thousands of idle calls.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// tonic allocates each call's encode and decode buffers up front, 8 KiB apiece by default: an
/// idle proxied connection held 16 KiB at the server (bench, section 4) for no data. Both
/// buffers grow to the message on demand, and a bulk chunk's buffer is handed on (split, not
/// reused) anyway; what starting small costs is a small allocation per message (or batch) of
/// small traffic, where 8 KiB would have served several.
const INITIAL_BUFFER: usize = 256;

/// Encoded messages are handed to HTTP/2 once this much is waiting (or nothing more is
/// queued): a bulk chunk goes at once, small ones that queue up go together.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `tonic_prost::ProstCodec` with [`INITIAL_BUFFER`]; named by the generated code
/// (`build.rs`, `codec_path`).
#[derive(Debug)]
pub(crate) struct TunnelCodec<T, U>(PhantomData<fn(T) -> U>);

impl<T, U> Default for TunnelCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for TunnelCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD))
    }
}
