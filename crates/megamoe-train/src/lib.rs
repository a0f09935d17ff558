//! megamoe-train (skeleton; filled by its issue).
