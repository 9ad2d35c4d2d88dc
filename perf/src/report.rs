//! How every `perf` report ends.

use anyhow::Result;
use std::io::Write;

/// Ends a report written to `out`: with `--json` (`json`), one line of JSON after the text,
/// built by `value` only then; and flushes.
pub fn end(out: &mut impl Write, json: bool, value: impl FnOnce() -> Result<serde_json::Value>) -> Result<()> {
    if json {
        writeln!(out, "{}", value()?)?;
    }
    out.flush()?;
    Ok(())
}
