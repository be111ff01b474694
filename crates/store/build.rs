//! `embed_migrations!` reads `migrations/` at compile time; this makes a new
//! or edited migration rebuild the crate.

fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
