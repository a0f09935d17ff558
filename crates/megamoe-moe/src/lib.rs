//! megamoe-moe (skeleton; filled by its issue).
