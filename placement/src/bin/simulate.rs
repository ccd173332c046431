use clap::Parser;
use ringmaster_placement::simulate;

#[derive(Parser)]
#[command(name = "ringmaster-simulate", version)]
struct Cli {
    #[command(flatten)]
    args: simulate::SimulateArgs,
}

fn main() -> std::process::ExitCode {
    match simulate::run(&Cli::parse().args) {
        Ok(text) => {
            print!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringmaster-simulate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
