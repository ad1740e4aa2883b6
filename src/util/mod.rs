//! Small pieces shared by several stages, with no home of their own in the data flow.

pub mod columns;
pub mod hash;
pub mod text;
