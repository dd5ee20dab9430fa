//! Running the model: sampling, stop strings, step-wise sequences and the generation loop
//! (the request queue joins later).

pub mod generate;
pub mod sampling;
pub mod sequence;
pub mod stop;
