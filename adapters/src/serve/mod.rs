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

/// What a controller's stream yields besides its reconciles' ends: a failed reconcile was already
/// reported by its error policy (and is retried); a watch that fails (RBAC, a lost connection) is
/// reported here, once a failure, as a warning on stderr (the process's log) — not dropped.
pub(crate) fn report_stream_error<E: std::error::Error, Q: std::error::Error>(
    kind: &str,
    e: &kube::runtime::controller::Error<E, Q>,
) {
    use kube::runtime::controller::Error;
    match e {
        Error::ReconcilerFailed(..) | Error::ObjectNotFound(..) => {}
        other => eprintln!("warning: {kind} controller: {other}"),
    }
}
