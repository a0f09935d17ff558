//! megamoe-pipeline (skeleton; filled by its issue).
