//! Long input (SPEC §6): splitting text into chunks and joining audio parts into one file.
