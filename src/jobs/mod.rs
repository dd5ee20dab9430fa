//! Job runners for long admin work: persistence through `store`, forward passes through the
//! engine (as background work), so the engine itself knows nothing of SQLite.

pub mod calibration;
pub mod evaluation;
pub mod queue;
pub mod recipe_source;
