//! The job state machine, in one place:
//!
//! ```text
//!   submitted → admitted → running ⇄ frozen
//!        │          │         │        │
//!        └──────────┴─────────┴────────┴──→ exited | killed | failed | lost
//! ```
//!
//! `submitted`: accepted and recorded. `admitted`: may run (there is no scheduler class
//! yet, so admission is immediate). `running`/`frozen`: the job's processes exist.
//! `exited`: ended by itself; `killed`: ended because someone or something cancelled it
//! (kill, timeout, lease end); `failed`: never ran its command (setup or exec failed, or
//! the host refused); `lost`: its processes vanished while no daemon watched.

use crate::api::types::JobState::{self, *};

/// Whether `from → to` is a transition of the state machine.
pub fn allowed(from: JobState, to: JobState) -> bool {
    matches!(
        (from, to),
        (Submitted, Admitted)
            | (Admitted, Running)
            | (Running, Frozen)
            | (Frozen, Running)
            | (Submitted | Admitted, Failed | Killed | Lost)
            | (Running | Frozen, Exited | Killed | Failed | Lost)
    )
}

/// Checks a transition; the error is what an API caller is told (409).
pub fn check(id: &str, from: JobState, to: JobState) -> Result<(), String> {
    if allowed(from, to) {
        Ok(())
    } else {
        Err(format!("job {id} is {from}; it cannot become {to}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_have_no_way_out() {
        for from in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in JobState::ALL {
                assert!(!allowed(from, to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn the_main_path_is_allowed() {
        for (a, b) in [
            (Submitted, Admitted),
            (Admitted, Running),
            (Running, Frozen),
            (Frozen, Running),
            (Running, Exited),
            (Frozen, Killed),
        ] {
            assert!(allowed(a, b), "{a} -> {b}");
        }
        assert!(!allowed(Running, Admitted));
        assert!(check("x", Exited, Running).unwrap_err().contains("exited"));
    }
}
