//! snapsync's daemon.

pub mod config;
pub mod cron;
mod guard;
pub mod limit;
pub mod record;
pub mod retention;
pub mod runner;
pub mod schedule;
pub mod scheduler;
pub mod state;
pub mod stores;
pub mod units;
