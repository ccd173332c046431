use clap::Parser;
use ringmaster_placement::{bench, simulate};

#[derive(Parser)]
#[command(name = "ringmaster-simulate", version)]
struct Cli {
    #[command(flatten)]
    args: simulate::SimulateArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = if cli.args.bench {
        bench::run(&cli.args).map(|table| print!("{table}"))
    } else {
        simulate::simulate(&cli.args).map(|report| {
            print!("{}", report.table);
            for f in &report.files {
                println!("wrote {}", f.display());
            }
        })
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmaster-simulate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
