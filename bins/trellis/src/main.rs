//! `trellis`: parse the command line, wire standard input/output and Ctrl-C,
//! hand over to the library.

use std::io::{IsTerminal, Write};

use clap::Parser;
use trellis_cli::{Cli, Io};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let (interrupt, mut interrupts) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if interrupt.send(()).is_err() {
                break;
            }
        }
    });
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let terminal = std::io::stdin().is_terminal();
    let color = out.is_terminal();
    let mut io = Io {
        stdin: &mut stdin,
        out: &mut out,
        err: &mut err,
        interrupts: &mut interrupts,
        terminal,
        color,
    };
    let code = match trellis_cli::run(cli, &mut io).await {
        Ok(()) => 0,
        Err(e) if e.reader_gone() => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e}");
            i32::from(e.exit_code())
        }
    };
    let _ = std::io::stdout().flush();
    // Not a return: a read of standard input blocked on its thread would
    // hold the runtime's shutdown until the next line.
    std::process::exit(code);
}
