//! The strata coordinator: the `strata` command line, the model store, and (as the
//! cluster grows) planning stages across workers and serving users.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod engine;
pub mod model_store;
pub mod planner;
