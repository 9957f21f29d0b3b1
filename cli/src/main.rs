//! `berth`: the docker-like command line, a client of berthd's Docker Engine API.

mod args;
mod body;
mod build;
mod client;
mod container;
mod cp;
mod format;
mod image;
mod inspect;
mod network;
mod opts;
mod raw;
mod stats;
mod stream;
mod system;
mod template;
mod tty;
mod volume;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::client::{Exit, report};

/// docker's management commands (`container ls`, `image rm`, …) as the short forms they
/// stand for.
fn management_alias(mut argv: Vec<String>) -> Vec<String> {
    // The first word that is not a global flag (or its value) is the command.
    let mut i = 1;
    while i < argv.len() {
        match argv[i].as_str() {
            "-H" | "--host" => i += 2,
            a if a.starts_with("--host=") || (a.starts_with("-H") && a.len() > 2) => i += 1,
            _ => break,
        }
    }
    let (Some(group), Some(sub)) = (argv.get(i).cloned(), argv.get(i + 1).cloned()) else {
        return argv;
    };
    let short = match (group.as_str(), sub.as_str()) {
        ("container", "ls" | "list" | "ps") => "ps",
        ("container", "remove") => "rm",
        (
            "container",
            "run" | "create" | "start" | "stop" | "restart" | "kill" | "rm" | "wait" | "rename"
            | "logs" | "inspect" | "port" | "top" | "stats" | "exec" | "attach" | "cp",
        ) => sub.as_str(),
        ("image", "ls" | "list") => "images",
        ("image", "rm" | "remove") => "rmi",
        ("image", "pull" | "push" | "tag" | "history" | "save" | "load" | "import" | "inspect") => {
            sub.as_str()
        }
        _ => return argv,
    }
    .to_owned();
    argv.splice(i..i + 2, [short]);
    argv
}

fn main() {
    let cli = match Cli::try_parse_from(management_alias(std::env::args().collect())) {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                // docker exits 125 on a flag it cannot parse, whatever the command.
                _ => 125,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth: start the async runtime: {e}");
            std::process::exit(125);
        }
    };
    // Fails the way docker's commands fail: `run` with 125 (its code space is the
    // container's), every other command with 1.
    let is_run = matches!(cli.command, Command::Run(_));
    let default_failure = if is_run { 125 } else { 1 };
    let code = match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
                *code
            } else {
                if is_run {
                    // docker names itself in front of what `run` could not do.
                    eprintln!("berth: {}", client::message(&e));
                } else {
                    report(&e);
                }
                client::exit_code_of(&e).unwrap_or(default_failure)
            }
        }
    };
    // Not dropping the runtime: a blocked read of our stdin would hold its shutdown.
    std::process::exit(code);
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let host = cli.host.clone();
    let d = || client::connect(&host);
    match cli.command {
        Command::Run(a) => container::run(&d()?, a).await,
        Command::Create(a) => container::create_cmd(&d()?, a).await,
        Command::Start(a) => container::start(&d()?, a).await,
        Command::Stop(a) => container::stop(&d()?, a).await,
        Command::Restart(a) => container::restart(&d()?, a).await,
        Command::Kill(a) => container::kill(&d()?, a).await,
        Command::Rm(a) => container::rm(&d()?, a).await,
        Command::Wait(a) => container::wait(&d()?, a).await,
        Command::Rename(a) => container::rename(&d()?, a).await,
        Command::Ps(a) => container::ps(&d()?, a).await,
        Command::Logs(a) => container::logs(&d()?, a).await,
        Command::Inspect(a) => inspect::inspect(&d()?, a).await,
        Command::Port(a) => container::port(&d()?, a).await,
        Command::Top(a) => container::top(&d()?, a).await,
        Command::Stats(a) => stats::stats(&d()?, a).await,
        Command::Exec(a) => container::exec(&d()?, a).await,
        Command::Attach(a) => container::attach(&d()?, a).await,
        Command::Cp(a) => cp::cp(&d()?, a).await,
        Command::Images(a) => image::images(&d()?, a).await,
        Command::Pull(a) => image::pull_cmd(&d()?, a).await,
        Command::Push(a) => image::push(&d()?, a).await,
        Command::Tag(a) => image::tag(&d()?, a).await,
        Command::Rmi(a) => image::rmi(&d()?, a).await,
        Command::History(a) => image::history(&d()?, a).await,
        Command::Save(a) => image::save(&d()?, a).await,
        Command::Load(a) => image::load(&d()?, a).await,
        Command::Import(a) => image::import(&d()?, a).await,
        Command::Build(a) => build::build(&d()?, a).await,
        Command::Commit(a) => build::commit(&d()?, a).await,
        Command::Info(a) => system::info(&d()?, a).await,
        Command::Version(a) => system::version(&d()?, a).await,
        Command::Network(a) => network::network(&d()?, a).await,
        Command::Volume(a) => volume::volume(&d()?, a).await,
        Command::System(a) => system::system(&d()?, a).await,
    }
}

#[cfg(test)]
mod tests {
    use super::management_alias;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn management_commands_map_to_the_short_ones() {
        assert_eq!(
            management_alias(v(&["berth", "container", "ls", "-a"])),
            v(&["berth", "ps", "-a"])
        );
        assert_eq!(
            management_alias(v(&["berth", "-H", "unix:///s", "image", "rm", "x"])),
            v(&["berth", "-H", "unix:///s", "rmi", "x"])
        );
        assert_eq!(
            management_alias(v(&["berth", "run", "container", "ls"])),
            v(&["berth", "run", "container", "ls"])
        );
        assert_eq!(management_alias(v(&["berth"])), v(&["berth"]));
    }
}
