//! megamoe-comm (skeleton; filled by its issue).
