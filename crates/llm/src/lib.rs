//! trellis-llm: the LlmService — a gateway over OpenAI-compatible model
//! providers (OpenAI, OpenRouter, vLLM, Ollama, llama.cpp …) through
//! async-openai: streaming, retries and failover, circuit breakers,
//! per-user limits and budgets in Redis, usage and cost accounting in
//! PostgreSQL, prompt trimming with a real tokenizer, a response cache.

mod breaker;
mod cache;
mod error;
mod gateway;
mod limits;
mod metrics;
mod prompt;
mod retrieval;
mod service;
mod upstream;
pub mod usage;

pub use error::LlmError;
pub use service::{Built, GENERATE, LlmSvc, USAGE_ALL, USAGE_OWN, service};
