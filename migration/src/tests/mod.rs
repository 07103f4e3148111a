//! Tests of both ends together.
