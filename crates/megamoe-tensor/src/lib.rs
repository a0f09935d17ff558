//! megamoe-tensor (skeleton; filled by its issue).
