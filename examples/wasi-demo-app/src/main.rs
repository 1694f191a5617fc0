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

/// SECONDS as a duration: digits with an optional fraction ("2", "0.25", ".5"); a negative number
/// is no time at all. Parsed by hand: Rust's float parser would add 12 KiB of tables to the data
/// image that every running instance maps.
fn parse_seconds(text: &str) -> Option<Duration> {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return None;
    }
    let seconds = if whole.is_empty() { 0 } else { whole.parse::<u64>().ok()? };
    let mut nanos: u32 = 0;
    for (place, digit) in fraction.bytes().take(9).enumerate() {
        nanos += u32::from(digit - b'0') * 10u32.pow(8 - place as u32);
    }
    Some(if negative { Duration::ZERO } else { Duration::new(seconds, nanos) })
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
            let duration = parse_seconds(text)
                .unwrap_or_else(|| fail(&format!("not a number of seconds: {}", text)));
            sleep(duration);
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
