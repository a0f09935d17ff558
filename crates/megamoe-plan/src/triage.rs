//! OOM triage.
