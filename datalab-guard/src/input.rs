//! Bad input: anything the operator can fix by changing flags, config or paths. These exit
//! with code 2 and one line, and are always raised before the kernel is touched.

use std::fmt;

/// An error in the operator's input (flags, config, paths).
#[derive(Debug)]
pub struct InputError(pub String);

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// Wraps any displayable error as bad input.
pub fn bad_input(message: impl fmt::Display) -> anyhow::Error {
    anyhow::Error::new(InputError(message.to_string()))
}

/// Exit code for an error chain: 2 for bad input, 1 for everything else.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err
        .chain()
        .any(|e| e.downcast_ref::<InputError>().is_some())
    {
        2
    } else {
        1
    }
}
