//! An interactive QMP shell, in the spirit of QEMU's `qmp-shell`.
//!
//! ```text
//! qmp-shell /run/vm1/qmp.sock
//! (QEMU) query-status
//! (QEMU) device_add driver=virtio-blk-pci id=d1 drive=n0 addr=0x9
//! (QEMU) {"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}
//! ```
//!
//! Line editing, history (kept in `~/.qhotplug_qmp_history`) and Tab completion of command names;
//! replies are pretty-printed, errors show their class and description, and events are printed as
//! they arrive, above the prompt. Ctrl-D or Ctrl-C leaves.

use std::process::ExitCode;

use futures::StreamExt;
use qhotplug_examples::parse_command;
use qhotplug_qmp::command::QueryCommands;
use qhotplug_qmp::{Config, Error};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, ExternalPrinter, Helper};

/// Completes the first word from the commands QEMU says it has.
struct Commands(Vec<String>);

impl Completer for Commands {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let word = &line[..pos];
        if word.contains(char::is_whitespace) || word.starts_with('{') {
            return Ok((pos, Vec::new()));
        }
        let matches = self
            .0
            .iter()
            .filter(|c| c.starts_with(word))
            .map(|c| Pair {
                display: c.clone(),
                replacement: format!("{c} "),
            })
            .collect();
        Ok((0, matches))
    }
}
impl Hinter for Commands {
    type Hint = String;
}
impl Highlighter for Commands {}
impl Validator for Commands {}
impl Helper for Commands {}

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: qmp-shell QMP_SOCKET");
        return ExitCode::from(2);
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let client = match runtime.block_on(Config::new().connect(&path)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qmp-shell: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let g = client.greeting();
    println!(
        "Connected to QEMU {} ({}). Ctrl-D leaves; Tab completes command names.",
        g.version.qemu, g.version.package
    );
    let commands = runtime
        .block_on(client.execute(&QueryCommands))
        .map(|list| {
            let mut names: Vec<String> = list.into_iter().map(|c| c.name).collect();
            names.sort();
            names
        })
        .unwrap_or_default();

    let mut editor: Editor<Commands, DefaultHistory> = match Editor::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("qmp-shell: terminal: {e}");
            return ExitCode::FAILURE;
        }
    };
    editor.set_helper(Some(Commands(commands)));
    let history =
        std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".qhotplug_qmp_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }

    // Events go above the prompt while the user types.
    if let Ok(mut printer) = editor.create_external_printer() {
        let mut events = client.events();
        runtime.spawn(async move {
            while let Some(item) = events.next().await {
                let line = match item {
                    Ok(e) => format!("event {}", e.to_json()),
                    Err(lagged) => format!("event ({lagged})"),
                };
                if printer.print(line).is_err() {
                    break;
                }
            }
        });
    }

    loop {
        match editor.readline("(QEMU) ") {
            Ok(line) if line.trim().is_empty() => {}
            Ok(line) => {
                let _ = editor.add_history_entry(line.as_str());
                let (name, args) = match parse_command(&line) {
                    Ok(parsed) => parsed,
                    Err(e) => {
                        println!("error: {e}");
                        continue;
                    }
                };
                match runtime.block_on(client.execute_raw(&name, &args)) {
                    Ok(reply) => println!(
                        "{}",
                        serde_json::to_string_pretty(&reply).unwrap_or_default()
                    ),
                    Err(Error::Qmp { error, .. }) => {
                        println!("error: {}: {}", error.class, error.desc)
                    }
                    Err(Error::Disconnected) => {
                        println!("QEMU went away");
                        break;
                    }
                    Err(e) => println!("error: {e}"),
                }
            }
            Err(ReadlineError::Eof | ReadlineError::Interrupted) => break,
            Err(e) => {
                eprintln!("qmp-shell: {e}");
                break;
            }
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    ExitCode::SUCCESS
}
