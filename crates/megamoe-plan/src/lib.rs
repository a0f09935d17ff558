//! megamoe-plan: run configuration, validation and planning (skeleton; filled by issue 2).

mod schedule_kind;
pub use schedule_kind::{ScheduleKind, UnknownSchedule};
