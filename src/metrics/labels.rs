//! The closed label sets of moat's metrics: one enum per label, whose `as_str` is the label value. Nothing
//! outside these sets (and the configured listener and certificate names) ever becomes a label value.

/// Declares a closed label set: an enum whose `as_str` is the label value.
macro_rules! label_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// How many values there are (the length of a per-value handle cache).
            pub const COUNT: usize = Self::ALL.len();

            /// This value's position in [`Self::ALL`].
            pub fn index(self) -> usize {
                self as usize
            }

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
}

label_enum! {
    /// `result` of [`CONNECTIONS_TOTAL`].
    ConnResult {
        /// Admitted; a session starts.
        Accepted => "accepted",
        /// Refused with `421` because a connection limit was reached.
        RejectedLimit => "rejected_limit",
        /// Refused by an IP allow/deny list.
        RejectedIp => "rejected_ip",
    }
}

label_enum! {
    /// `version` of [`TLS_HANDSHAKES_TOTAL`].
    TlsVersion {
        /// TLS 1.2.
        Tls12 => "TLSv1.2",
        /// TLS 1.3.
        Tls13 => "TLSv1.3",
        /// Not negotiated (the handshake failed or timed out).
        None => "none",
    }
}

label_enum! {
    /// `result` of [`TLS_HANDSHAKES_TOTAL`].
    TlsResult {
        /// The handshake completed.
        Ok => "ok",
        /// The handshake failed.
        Error => "error",
        /// The handshake did not finish in time.
        Timeout => "timeout",
    }
}

label_enum! {
    /// `command` of [`COMMANDS_TOTAL`]: the SMTP verbs moat knows, everything else is `UNKNOWN`.
    Verb {
        /// EHLO.
        Ehlo => "EHLO",
        /// HELO.
        Helo => "HELO",
        /// MAIL FROM.
        Mail => "MAIL",
        /// RCPT TO.
        Rcpt => "RCPT",
        /// DATA.
        Data => "DATA",
        /// BDAT (RFC 3030).
        Bdat => "BDAT",
        /// RSET.
        Rset => "RSET",
        /// NOOP.
        Noop => "NOOP",
        /// QUIT.
        Quit => "QUIT",
        /// VRFY.
        Vrfy => "VRFY",
        /// EXPN.
        Expn => "EXPN",
        /// HELP.
        Help => "HELP",
        /// STARTTLS (RFC 3207).
        Starttls => "STARTTLS",
        /// AUTH (RFC 4954).
        Auth => "AUTH",
        /// Anything else.
        Unknown => "UNKNOWN",
    }
}

label_enum! {
    /// `verdict` of [`MESSAGES_TOTAL`]: how a transaction ended.
    MessageVerdict {
        /// The upstream took the message and the client got its `250`.
        Accepted => "accepted",
        /// Refused permanently (by moat or the upstream).
        Rejected => "rejected",
        /// Refused temporarily (by moat or the upstream, or the upstream failed).
        Tempfailed => "tempfailed",
        /// Acknowledged to the client but deliberately not relayed.
        Discarded => "discarded",
        /// The transaction ended without an end of data (RSET, disconnect, shutdown).
        Aborted => "aborted",
    }
}

label_enum! {
    /// `result` of [`RECIPIENTS_TOTAL`].
    RcptResult {
        /// The client got a 2xx reply.
        Accepted => "accepted",
        /// The client got a 4xx or 5xx reply.
        Rejected => "rejected",
    }
}

label_enum! {
    /// `limit` of [`LIMIT_HITS_TOTAL`]: the configured bounds (config `[limits]`).
    Limit {
        /// Global concurrent connections.
        MaxConnections => "max_connections",
        /// Concurrent connections from one client IP.
        MaxConnectionsPerIp => "max_connections_per_ip",
        /// Message size.
        MaxMessageSize => "max_message_size",
        /// Recipients per transaction.
        MaxRecipients => "max_recipients",
        /// Errors per session.
        MaxErrors => "max_errors",
        /// Length of a command line.
        MaxCommandLine => "max_command_line",
        /// Length of a message text line.
        MaxTextLine => "max_text_line",
        /// A bare CR or LF was refused.
        BareLineEndings => "bare_line_endings",
        /// Idle time between commands.
        IdleTimeout => "idle_timeout",
        /// Time waiting for message data.
        DataTimeout => "data_timeout",
        /// Total session time.
        SessionTimeout => "session_timeout",
        /// The spool's memory budget.
        MemoryBudget => "memory_budget",
        /// The spool's disk budget (bytes in spill files).
        SpoolDiskBudget => "spool_disk_budget",
    }
}

label_enum! {
    /// `kind` of [`UPSTREAM_ERRORS_TOTAL`].
    UpstreamErrorKind {
        /// Could not connect.
        Connect => "connect",
        /// A connect, command or reply deadline expired.
        Timeout => "timeout",
        /// The connection broke.
        Io => "io",
        /// The upstream said something moat could not use (bad reply, refused greeting, no XCLIENT).
        Protocol => "protocol",
        /// STARTTLS to the upstream failed.
        Tls => "tls",
    }
}

label_enum! {
    /// `phase` of [`UPSTREAM_REPLIES_TOTAL`].
    UpstreamPhase {
        /// Reply to MAIL FROM.
        Mail => "mail",
        /// Reply to RCPT TO.
        Rcpt => "rcpt",
        /// Final reply to the message (or a refusal of DATA itself).
        Data => "data",
    }
}

label_enum! {
    /// `result` of [`RULES_RELOAD_TOTAL`] and [`TLS_RELOAD_TOTAL`].
    ReloadResult {
        /// The new set is in force.
        Ok => "ok",
        /// The new set was refused; the old one stays.
        Error => "error",
    }
}

label_enum! {
    /// `mechanism` of [`AUTH_ATTEMPTS_TOTAL`]: the SASL mechanisms moat offers.
    AuthMechanism {
        /// AUTH PLAIN (RFC 4616).
        Plain => "PLAIN",
        /// AUTH LOGIN.
        Login => "LOGIN",
    }
}

label_enum! {
    /// `result` of [`AUTH_ATTEMPTS_TOTAL`].
    AuthResult {
        /// The credentials were right.
        Success => "success",
        /// Wrong or unknown credentials (also a malformed exchange).
        Failure => "failure",
        /// Refused by the brute-force lockout without checking the credentials.
        Locked => "locked",
        /// The client cancelled the exchange with `*`.
        Cancelled => "cancelled",
    }
}

impl AuthMechanism {
    /// From a mechanism name as the client sent it (case-insensitive); `None` outside the closed set.
    pub fn from_name(name: &str) -> Option<AuthMechanism> {
        AuthMechanism::ALL.iter().copied().find(|m| m.as_str().eq_ignore_ascii_case(name))
    }
}

impl Verb {
    /// The verb of a command line (case-insensitive, up to the first space or `:`); `Unknown` otherwise.
    pub fn from_line(line: &[u8]) -> Verb {
        let end = line.iter().position(|&b| matches!(b, b' ' | b':' | b'\r' | b'\n')).unwrap_or(line.len());
        let word = &line[..end];
        Verb::ALL
            .iter()
            .copied()
            .find(|v| *v != Verb::Unknown && v.as_str().as_bytes().eq_ignore_ascii_case(word))
            .unwrap_or(Verb::Unknown)
    }
}

impl TlsVersion {
    /// From a protocol name such as rustls reports it (`"TLSv1.3"`, `"TLSv1_3"`); anything else is `None`.
    pub fn from_name(name: &str) -> TlsVersion {
        match name {
            "TLSv1.2" | "TLSv1_2" => TlsVersion::Tls12,
            "TLSv1.3" | "TLSv1_3" => TlsVersion::Tls13,
            _ => TlsVersion::None,
        }
    }
}

label_enum! {
    /// `result` of the quarantine and archive copy counters.
    CopyResult {
        /// The copy was made (written and synced, or accepted by the upstream as a recipient).
        Ok => "ok",
        /// It could not be made.
        Error => "error",
    }
}

label_enum! {
    /// `kind` of [`super::STATE_ERRORS_TOTAL`].
    StateError {
        /// No answer within `state.command_timeout`.
        Timeout => "timeout",
        /// The store could not be reached or refused the command.
        Unavailable => "unavailable",
        /// A key held a value of another kind (a bug).
        WrongKind => "wrong_kind",
    }
}

label_enum! {
    /// `mode` of `moat_archive_copies_total`.
    ArchiveMode {
        /// An extra upstream recipient.
        Bcc => "bcc",
        /// A compressed file in the archive directory.
        Directory => "directory",
    }
}

label_enum! {
    /// `reason` of the expiry counters.
    ExpiryReason {
        /// Older than the configured retention.
        Age => "age",
        /// Removed, oldest first, to bring the store back under its disk budget.
        Budget => "budget",
    }
}

label_enum! {
    /// `reason` of [`super::PROXY_HEADERS_REFUSED_TOTAL`].
    ProxyRefusal {
        /// The connection came from outside `proxy_trusted`.
        Untrusted => "untrusted",
        /// The header was malformed, of a version the listener does not accept, or too long.
        Malformed => "malformed",
        /// The header did not arrive within the header timeout, or the peer closed first.
        Timeout => "timeout",
    }
}

label_enum! {
    /// `result` of [`super::GREYLIST_TOTAL`].
    GreylistResult {
        /// A new or too early triplet: the recipient got `451 4.7.1`.
        Deferred => "deferred",
        /// A retry after the delay passed (the triplet is remembered as passed).
        Passed => "passed",
        /// The client network passed often enough to be allowed outright.
        AutoAllowed => "auto_allowed",
    }
}
