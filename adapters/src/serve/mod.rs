//! The in-cluster service: the `backups.blockwise.dev` resource ([`crd`]) and
//! `restores.blockwise.dev` ([`restores`]) and `schedules.blockwise.dev` ([`schedules`]), their controller
//! ([`controller`], `blockwise serve`), metrics and health ([`metrics`]), and the manifests that
//! install it ([`install`], `blockwise install`).

pub mod controller;
pub mod crd;
pub mod install;
pub mod metrics;
pub mod restores;
pub mod schedules;
