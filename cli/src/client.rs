//! Talking to the admin API: connecting (and why it failed), one call per subcommand, and the
//! errors that decide the exit code.

use std::{io::Write as _, time::Duration};

use mermin_protocol::admin::v1::{
    AgentsRequest, DrainRequest, QueuesRequest, RemoveMemberRequest, StatusRequest,
    admin_service_client::AdminServiceClient,
};
use tonic::{
    Code, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    args::{Cli, Command, Output, TlsArgs},
    render,
};

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("{endpoint} answered {code:?}: {message}", code = status.code(), message = status.message())]
    Server { endpoint: String, status: Status },
    #[error("writing the output: {0}")]
    Output(String),
    #[error("TLS to {endpoint}: {reason}")]
    Tls { endpoint: String, reason: String },
}

impl CliError {
    /// 3 when the endpoint could not be reached, 1 when it answered with an error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } | CliError::Tls { .. } => 3,
            CliError::Server { status, .. } if status.code() == Code::Unavailable => 3,
            CliError::Server { .. } | CliError::Output(_) => 1,
        }
    }
}

/// Runs the subcommand and prints its answer on standard output.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let endpoint = cli.endpoint.clone();
    let mut client = AdminServiceClient::new(connect(&endpoint, &cli.tls).await?);
    // A status with a source is the transport's (the connection broke, or the TLS handshake
    // was refused), not an answer from the aggregator.
    let tls_hint = if uses_tls(&endpoint, &cli.tls) {
        " (over TLS: the aggregator refuses a client without a certificate it trusts)"
    } else {
        ""
    };
    let failed = |status: Status| match std::error::Error::source(&status) {
        Some(transport) => CliError::Unreachable {
            endpoint: endpoint.clone(),
            reason: format!("{}{tls_hint}", causes(transport)),
        },
        None => CliError::Server {
            endpoint: endpoint.clone(),
            status,
        },
    };
    let out = cli.output;
    let text = match &cli.command {
        Command::Status => {
            let status = client.status(StatusRequest {}).await.map_err(failed)?;
            render::status(&status.into_inner(), out)
        }
        Command::Agents => {
            let agents = client.agents(AgentsRequest {}).await.map_err(failed)?;
            render::agents(&agents.into_inner(), out)
        }
        Command::Shards => {
            let status = client.status(StatusRequest {}).await.map_err(failed)?;
            let queues = client.queues(QueuesRequest {}).await.map_err(failed)?;
            render::shards(&status.into_inner(), &queues.into_inner(), out)
        }
        Command::Queues => {
            let queues = client.queues(QueuesRequest {}).await.map_err(failed)?;
            render::queues(&queues.into_inner(), out)
        }
        Command::Drain => {
            client.drain(DrainRequest {}).await.map_err(failed)?;
            Ok("drained\n".to_owned())
        }
        Command::RemoveMember { id } => {
            let request = RemoveMemberRequest { id: id.clone() };
            client.remove_member(request).await.map_err(failed)?;
            Ok(format!("member {id} removed\n"))
        }
        Command::Observe(args) => {
            let mut flows = client
                .observe(args.request())
                .await
                .map_err(failed)?
                .into_inner();
            let colour = out == Output::Table && render::stdout_is_terminal();
            while let Some(flow) = flows.message().await.map_err(failed)? {
                print(&render::flow(&flow, out, colour).map_err(CliError::Output)?)?;
            }
            return Ok(());
        }
    };
    print(&text.map_err(CliError::Output)?)
}

fn print(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| CliError::Output(e.to_string()))
}

/// A channel to `endpoint`, connected now so that an unreachable endpoint (or a refused TLS
/// handshake) is reported as such.
async fn connect(endpoint: &str, tls: &TlsArgs) -> Result<Channel, CliError> {
    let unreachable = |reason: String| CliError::Unreachable {
        endpoint: endpoint.to_owned(),
        reason,
    };
    // TLS files given with an http:// endpoint (the default one, say) ask for TLS: tonic only
    // speaks it to an https:// URI.
    let tls_wanted = uses_tls(endpoint, tls);
    let uri = match endpoint.strip_prefix("http://") {
        Some(rest) if tls_wanted => format!("https://{rest}"),
        _ => endpoint.to_owned(),
    };
    let mut target = Endpoint::from_shared(uri)
        .map_err(|e| unreachable(causes(&e)))?
        .connect_timeout(CONNECT_TIMEOUT);
    if tls_wanted {
        let config = tls_config(tls).map_err(|reason| CliError::Tls {
            endpoint: endpoint.to_owned(),
            reason,
        })?;
        target = target.tls_config(config).map_err(|e| CliError::Tls {
            endpoint: endpoint.to_owned(),
            reason: causes(&e),
        })?;
    }
    target.connect().await.map_err(|e| unreachable(causes(&e)))
}

fn uses_tls(endpoint: &str, tls: &TlsArgs) -> bool {
    endpoint.starts_with("https://")
        || tls.ca.is_some()
        || tls.cert.is_some()
        || tls.server_name.is_some()
}

fn tls_config(tls: &TlsArgs) -> Result<ClientTlsConfig, String> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
    };
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = &tls.ca {
        config = config.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(name) = &tls.server_name {
        config = config.domain_name(name.clone());
    }
    Ok(config)
}

/// An error with its sources: `transport error: tcp connect error: Connection refused`.
fn causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
