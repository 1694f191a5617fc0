//! wasi-demo-app: a tiny WASI command for trying out kwasm.
//!
//! Usage: wasi-demo-app.wasm [COMMAND] [ARGS...]
//!   echo ARGS...        print ARGS joined by spaces
//!   sleep SECONDS       sleep (fractions allowed), then return
//!   exit CODE           exit with CODE
//!   write PATH TEXT...  write TEXT (joined by spaces) to PATH
//!   daemon              print a verse every second, forever (the default)
use std::io::Write;
use std::process::exit;
use std::thread::sleep;
use std::time::Duration;

const VERSE: &str = "Row, row, row your module,\n\
gently down the stream.\n\
Merrily, merrily, merrily, merrily,\n\
a sandbox is but a dream.\n";

fn fail(message: &str) -> ! {
    eprintln!("{}", message);
    exit(1);
}

fn argument<'a>(args: &'a [String], index: usize, what: &str) -> &'a str {
    match args.get(index) {
        Some(value) => value,
        None => fail(&format!("missing argument: {}", what)),
    }
}

fn daemon() -> ! {
    let stdout = std::io::stdout();
    loop {
        {
            let mut out = stdout.lock();
            let _ = out.write_all(VERSE.as_bytes());
            let _ = out.write_all(b"\n");
            let _ = out.flush();
        }
        sleep(Duration::from_secs(1));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let command = args.get(1).map(String::as_str).unwrap_or("daemon");
    match command {
        "echo" => println!("{}", args[2..].join(" ")),
        "sleep" => {
            let text = argument(&args, 2, "SECONDS");
            let seconds: f64 = text
                .parse()
                .unwrap_or_else(|_| fail(&format!("not a number of seconds: {}", text)));
            sleep(Duration::from_secs_f64(seconds.max(0.0)));
        }
        "exit" => {
            let text = argument(&args, 2, "CODE");
            let code: i32 = text
                .parse()
                .unwrap_or_else(|_| fail(&format!("not an exit code: {}", text)));
            exit(code);
        }
        "write" => {
            let path = argument(&args, 2, "PATH");
            let text = args[3..].join(" ");
            if let Err(error) = std::fs::write(path, text) {
                fail(&format!("cannot write {}: {}", path, error));
            }
        }
        "daemon" => daemon(),
        other => fail(&format!("unknown command: {}", other)),
    }
}
