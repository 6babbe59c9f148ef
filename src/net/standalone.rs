//! The proxy of one `agentd run` job: served on a small runtime of its own, on threads
//! of agentd's process, for as long as the job runs. (The daemon serves every job's
//! endpoints on its own runtime instead.)

use super::{Decision, EgressObserver, EgressPolicy, Membrane, NetworkReport, ProxyListeners};
use std::sync::Arc;

/// Prints each denial on agentd's stderr, where the operator running the job looks.
struct PrintDenials {
    job: String,
    /// The job's view writer, told at once so the job can read why.
    view: crate::job::selfview::Wake,
}

impl EgressObserver for PrintDenials {
    fn decided(&self, d: &Decision) {
        if !d.allowed {
            self.view.refresh();
            crate::job::say(&format!(
                "agentd: job {}: egress denied ({} {}): {} [{}]",
                self.job, d.protocol, d.destination, d.reason, d.rule
            ));
        }
    }
}

/// The running proxy; `finish` stops it and says what the job did.
pub struct StandaloneProxy {
    membrane: Arc<Membrane>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandaloneProxy {
    pub fn start(
        job: &str,
        policy: EgressPolicy,
        listeners: ProxyListeners,
        view: crate::job::selfview::Wake,
    ) -> std::io::Result<StandaloneProxy> {
        let observer = Arc::new(PrintDenials {
            job: job.to_owned(),
            view,
        });
        let membrane = Membrane::new(job, policy, observer);
        // One worker: on a small host a second one only competes with the job for CPU
        // (scripts/bench-egress measured one as faster on two cores).
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("agentd-proxy")
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = {
            let _enter = runtime.enter();
            membrane.serve(listeners)?
        };
        let thread = std::thread::Builder::new()
            .name("agentd-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let _serving = serving;
                    let _ = stopped.await;
                });
                // Relays still open end with the runtime.
                runtime.shutdown_background();
            })?;
        Ok(StandaloneProxy {
            membrane,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The job's membrane (its counters and denials, for the job's view).
    pub fn membrane(&self) -> Arc<Membrane> {
        self.membrane.clone()
    }

    /// Stops serving and returns the report of the job's network use.
    pub fn finish(mut self) -> NetworkReport {
        self.stop_now();
        self.membrane.report()
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StandaloneProxy {
    fn drop(&mut self) {
        self.stop_now();
    }
}
