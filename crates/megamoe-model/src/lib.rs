//! megamoe-model (skeleton; filled by its issue).
