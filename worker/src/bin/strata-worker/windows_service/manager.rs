//! The service manager's side of `strata-worker service`, on Windows: installing,
//! removing, starting and stopping the service, and running as it (`service run`,
//! which the service manager starts).

use std::ffi::OsString;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use strata_platform::firewall::{self, InboundRule};
use strata_worker::config::ServiceCommand;
use strata_worker::WorkerArgs;
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept, ServiceErrorControl,
    ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod, ServiceInfo, ServiceStartType, ServiceState,
    ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

use super::{firewall_ports, log_path, service_env, store, StoredFlags, FIREWALL_RULE, SERVICE_NAME};
use crate::launch;

/// How long `service start` / `stop` wait for the service to get there.
const STATE_WAIT: Duration = Duration::from_secs(60);

/// Windows' "the service process could not connect to the service controller": what
/// `service run` typed in a console gets.
const ERROR_FAILED_SERVICE_CONTROLLER_CONNECT: i32 = 1063;
/// "The specified service does not exist as an installed service."
const ERROR_SERVICE_DOES_NOT_EXIST: i32 = 1060;
/// "An instance of the service is already running."
const ERROR_SERVICE_ALREADY_RUNNING: i32 = 1056;

pub fn run_command(command: ServiceCommand) -> anyhow::Result<()> {
    match command {
        ServiceCommand::Install(install) => {
            let config = store(&install)?;
            install_service()?;
            println!("installed the service {SERVICE_NAME}; it starts with Windows");
            println!("  flags: {} (stored in {})", shown(&install.worker_flags), super::flags_path().display());
            println!("  log:   {}", log_path().display());
            open_firewall(&firewall_ports(&config));
            println!("start it now with: strata-worker service start");
            Ok(())
        }
        ServiceCommand::Uninstall => uninstall(),
        ServiceCommand::Start => {
            let service = open(ServiceAccess::START | ServiceAccess::QUERY_STATUS)?;
            // Already started (it starts with Windows, and Wine starts it with its
            // server): nothing to do but wait for it.
            if service.query_status()?.current_state == ServiceState::Stopped {
                match service.start::<&str>(&[]) {
                    Err(e) if os_error(&e) != Some(ERROR_SERVICE_ALREADY_RUNNING) => {
                        return Err(anyhow::Error::new(e).context("the service manager refused to start the service"))
                    }
                    _ => {}
                }
            }
            wait_for(&service, ServiceState::Running)?;
            println!("the service {SERVICE_NAME} is running (log: {})", log_path().display());
            Ok(())
        }
        ServiceCommand::Stop => {
            let service = open(ServiceAccess::STOP | ServiceAccess::QUERY_STATUS)?;
            if service.query_status()?.current_state != ServiceState::Stopped {
                service.stop().context("the service manager refused to stop the service")?;
                wait_for(&service, ServiceState::Stopped)?;
            }
            println!("the service {SERVICE_NAME} is stopped");
            Ok(())
        }
        ServiceCommand::Run => run_as_service(),
    }
}

fn shown(flags: &[String]) -> String {
    if flags.is_empty() {
        "none (the defaults)".into()
    } else {
        flags.join(" ")
    }
}

fn manager(access: ServiceManagerAccess) -> anyhow::Result<ServiceManager> {
    ServiceManager::local_computer(None::<&str>, access)
        .context("cannot reach the service manager (run this as administrator)")
}

fn open(access: ServiceAccess) -> anyhow::Result<windows_service::service::Service> {
    manager(ServiceManagerAccess::CONNECT)?.open_service(SERVICE_NAME, access).map_err(|e| match os_error(&e) {
        Some(ERROR_SERVICE_DOES_NOT_EXIST) => {
            anyhow::anyhow!("the service {SERVICE_NAME} is not installed (strata-worker service install)")
        }
        _ => anyhow::Error::new(e).context(format!("cannot open the service {SERVICE_NAME} (run this as administrator)")),
    })
}

fn os_error(e: &windows_service::Error) -> Option<i32> {
    match e {
        windows_service::Error::Winapi(io) => io.raw_os_error(),
        _ => None,
    }
}

/// Creates the service, or points an installed one at this executable again.
fn install_service() -> anyhow::Result<()> {
    let info = ServiceInfo {
        name: SERVICE_NAME.into(),
        display_name: "strata worker".into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: std::env::current_exe().context("cannot find this executable")?,
        launch_arguments: vec!["service".into(), "run".into()],
        dependencies: vec![],
        account_name: None,
        account_password: None,
    };
    let manager = manager(ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE)?;
    let access = ServiceAccess::CHANGE_CONFIG | ServiceAccess::QUERY_CONFIG | ServiceAccess::START;
    let service = match manager.open_service(SERVICE_NAME, access) {
        Ok(service) => {
            service.change_config(&info).context("cannot update the installed service")?;
            println!("the service was installed already: updated (restart it for new flags to apply)");
            service
        }
        Err(_) => manager.create_service(&info, access).context("cannot create the service")?,
    };
    let described = service
        .set_description("Holds a layer range of a language model for a strata cluster; yields to games.");
    // A crashed worker comes back by itself; the cluster replays what it held.
    let restarts = service.update_failure_actions(ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 3600)),
        reboot_msg: None,
        command: None,
        actions: Some(vec![ServiceAction { action_type: ServiceActionType::Restart, delay: Duration::from_secs(10) }]),
    });
    let on_errors = restarts.and_then(|()| service.set_failure_actions_on_non_crash_failures(true));
    for (what, result) in [("description", described), ("restart on failure", on_errors)] {
        if let Err(e) = result {
            eprintln!("warning: cannot set the service's {what}: {e}");
        }
    }
    Ok(())
}

fn open_firewall(ports: &[(firewall::Protocol, u16)]) {
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(e) => {
            eprintln!("warning: cannot find this executable, so no firewall rule was added: {e}");
            return;
        }
    };
    for &(protocol, port) in ports {
        let rule = InboundRule { name: FIREWALL_RULE, program: &program, protocol, port };
        match firewall::allow_inbound(&rule) {
            Ok(()) => println!("  firewall: {protocol:?} port {port} open to private networks"),
            Err(e) => eprintln!(
                "warning: could not open {protocol:?} port {port} in the firewall ({e}); as administrator: netsh {}",
                rule.add_arguments().join(" ")
            ),
        }
    }
}

fn uninstall() -> anyhow::Result<()> {
    let service = open(ServiceAccess::STOP | ServiceAccess::QUERY_STATUS | ServiceAccess::DELETE)?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        service.stop().context("the service manager refused to stop the service")?;
        wait_for(&service, ServiceState::Stopped)?;
    }
    service.delete().context("cannot remove the service")?;
    drop(service);
    match firewall::remove(FIREWALL_RULE) {
        Ok(()) => println!("removed the firewall rules {FIREWALL_RULE}"),
        Err(e) => eprintln!("warning: could not remove the firewall rules {FIREWALL_RULE}: {e}"),
    }
    let _ = std::fs::remove_file(super::flags_path());
    println!(
        "removed the service {SERVICE_NAME}; its log and cache stay in {}",
        strata_platform::paths::machine_data().display()
    );
    Ok(())
}

fn wait_for(service: &windows_service::service::Service, state: ServiceState) -> anyhow::Result<()> {
    let deadline = Instant::now() + STATE_WAIT;
    loop {
        let now = service.query_status()?.current_state;
        if now == state {
            return Ok(());
        }
        if now == ServiceState::Stopped && state == ServiceState::Running {
            anyhow::bail!("the service stopped again at once; its log says why: {}", log_path().display());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the service is {now:?} after {STATE_WAIT:?}, not {state:?}; see {}", log_path().display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The worker's flags, for `service_main`, which the dispatcher calls with none.
static ARGS: OnceLock<WorkerArgs> = OnceLock::new();

define_windows_service!(ffi_service_main, service_main);

/// `service run`: what the service manager starts. Reads the stored flags, logs to
/// the service's file, and hands the thread to the service dispatcher.
fn run_as_service() -> anyhow::Result<()> {
    let args = StoredFlags::load()?.args()?;
    let telemetry = launch::prepare(&args, launch::LogTo::File(&log_path()), &args.trace)?;
    let _ = ARGS.set(args);
    // Returns once the service has stopped.
    let dispatched = service_dispatcher::start(SERVICE_NAME, ffi_service_main);
    telemetry.shutdown();
    dispatched.map_err(|e| match os_error(&e) {
        Some(ERROR_FAILED_SERVICE_CONTROLLER_CONNECT) => anyhow::anyhow!(
            "`service run` is what the service manager starts; to run the worker in this console, \
             run strata-worker with its flags"
        ),
        _ => anyhow::Error::new(e).context("the service dispatcher failed"),
    })
}

fn service_main(_arguments: Vec<OsString>) {
    if let Err(e) = serve_as_service() {
        tracing::error!(error = %format!("{e:#}"), "the service stopped with an error");
    }
}

fn serve_as_service() -> anyhow::Result<()> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let handler = move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
            tracing::info!(?control, "the service manager asks the worker to stop");
            let _ = stop_tx.send(true);
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let status = service_control_handler::register(SERVICE_NAME, handler).context("cannot register with the service manager")?;
    let report = |state: ServiceState, code: u32| {
        let accepted =
            if state == ServiceState::Running { ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN } else { ServiceControlAccept::empty() };
        let wait_hint = if state == ServiceState::StopPending { Duration::from_secs(15) } else { Duration::ZERO };
        status.set_service_status(ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: accepted,
            exit_code: ServiceExitCode::Win32(code),
            checkpoint: 0,
            wait_hint,
            process_id: None,
        })
    };
    report(ServiceState::Running, 0)?;
    let args = ARGS.get().cloned().context("no flags were loaded")?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "the strata-worker service starts");
    let served = launch::serve(args, &service_env, async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    });
    if let Err(e) = &served {
        tracing::error!(error = %format!("{e:#}"), "the worker failed");
    }
    // A nonzero code counts as a failure, so the restart action applies (install
    // turns that on for failures other than crashes).
    report(ServiceState::Stopped, if served.is_ok() { 0 } else { 1 })?;
    served
}
