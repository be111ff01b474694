//! Generated Trellis contracts: one module per protobuf package, plus the
//! encoded `FILE_DESCRIPTOR_SET` that server reflection serves.
//!
//! The protos under `proto/` are the source of truth; nothing here is written
//! by hand except this module tree.

#![allow(clippy::all, missing_docs, rust_2018_idioms)]

/// The codec of every generated client and server: prost's, with 1 KiB
/// rather than 8 KiB as each call's initial encode and decode buffers (they
/// grow as a message needs). Most Trellis messages are small, and a server
/// holding thousands of open streams (idle chat conversations) pays those
/// two buffers per stream.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// Initial buffer of each call's encoder and decoder.
    pub const BUFFER_SIZE: usize = 1024;
    /// tonic's default: an encoder yields once this much is buffered.
    const YIELD_THRESHOLD: usize = 32 * 1024;

    #[derive(Debug, Clone)]
    pub struct Lean<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for Lean<T, U> {
        fn default() -> Self {
            Lean(PhantomData)
        }
    }

    impl<T, U> Codec for Lean<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
        }
    }
}

/// Every Trellis package's file descriptors (and their imports), encoded.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trellis_descriptor.bin"));

/// `trellis.auth.v1`: accounts' credentials, sessions, tokens, keys.
pub mod auth {
    pub mod v1 {
        tonic::include_proto!("trellis.auth.v1");

        /// Fully qualified name of the service, as used in health and reflection.
        pub const SERVICE_NAME: &str = "trellis.auth.v1.AuthService";
    }
}

/// `trellis.user.v1`: profiles, preferences, administration, roles, audit.
pub mod user {
    pub mod v1 {
        tonic::include_proto!("trellis.user.v1");

        /// Fully qualified name of the service, as used in health and reflection.
        pub const SERVICE_NAME: &str = "trellis.user.v1.UserService";
    }
}

/// `trellis.chat.v1`: sessions, history and streamed replies.
pub mod chat {
    pub mod v1 {
        tonic::include_proto!("trellis.chat.v1");

        /// Fully qualified name of the service, as used in health and reflection.
        pub const SERVICE_NAME: &str = "trellis.chat.v1.ChatService";
    }
}

/// `trellis.llm.v1`: the gateway to model providers.
pub mod llm {
    pub mod v1 {
        tonic::include_proto!("trellis.llm.v1");

        /// Fully qualified name of the service, as used in health and reflection.
        pub const SERVICE_NAME: &str = "trellis.llm.v1.LlmService";
    }
}

/// `trellis.search.v1`: documents, ranked full-text search, history.
pub mod search {
    pub mod v1 {
        tonic::include_proto!("trellis.search.v1");

        /// Fully qualified name of the service, as used in health and reflection.
        pub const SERVICE_NAME: &str = "trellis.search.v1.SearchService";
    }
}

/// `trellis.system.v1`: server information, the mesh's no-op path.
pub mod system {
    pub mod v1 {
        tonic::include_proto!("trellis.system.v1");

        /// Fully qualified name of the service, as used in health and reflection.
        pub const SERVICE_NAME: &str = "trellis.system.v1.SystemService";
    }
}
