//! megamoe-optim (skeleton; filled by its issue).
