//! snapsync's daemon.

pub mod config;
pub mod cron;
pub mod schedule;
pub mod units;
pub mod scheduler;
