use pgrx::prelude::*;
::pgrx::pg_module_magic!(name, version);
#[pg_extern]
fn version() -> &'static str { env!("CARGO_PKG_VERSION") }
