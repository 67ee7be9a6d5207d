//! What differs between the operating systems strata runs on, one module per
//! concern, so the rest of the code has no `cfg` of its own:
//!
//! * [`stop`]: the ways a process is asked to stop (Ctrl-C, SIGTERM on Unix; the
//!   console closing, log-off and system shutdown on Windows);
//! * [`process`]: children that end with this process; ending another process,
//!   gracefully where the system has a way;
//! * [`foreground`]: whether a full-screen program has the foreground;
//! * [`paths`]: where per-user caches and machine-wide service files live;
//! * [`files`]: whether a path still names an open file;
//! * [`local_socket`]: sockets between the processes of one user on one machine;
//! * [`doorbell`]: a thread's wait for a ring or for its local sockets;
//! * [`memory`]: keeping freed buffers for reuse, and giving freed memory back;
//! * [`nvidia`]: the names of NVIDIA's driver libraries;
//! * [`firewall`]: opening the worker's ports in the Windows firewall.

pub mod doorbell;
pub mod files;
pub mod firewall;
pub mod foreground;
pub mod local_socket;
pub mod memory;
pub mod nvidia;
pub mod paths;
pub mod process;
pub mod stop;
