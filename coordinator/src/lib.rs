//! The strata coordinator: the `strata` command line, the model store, and (as the
//! cluster grows) planning stages across workers and serving users.

pub mod cli;
pub mod model_store;
pub mod engine;
pub mod api;
pub mod cluster;
pub mod planner;
pub mod server;

pub use server::{run, Listeners, ServeConfig};
