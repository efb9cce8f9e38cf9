//! An in-process fake upstream MTA: speaks enough SMTP for moat's relay, records every transaction, and can
//! be scripted to fail at each phase.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What the fake does at each phase; `None` means the normal positive reply.
#[derive(Clone, Debug, Default)]
pub struct Script {
    /// Reply to MAIL instead of 250.
    pub mail: Option<String>,
    /// Reply to RCPT for recipients containing this text: (needle, reply).
    pub rcpt: Option<(String, String)>,
    /// Reply to DATA instead of 354.
    pub data: Option<String>,
    /// Reply after the message instead of 250.
    pub end: Option<String>,
    /// Close the connection when this command arrives ("MAIL", "RCPT", "DATA", "BODY" = mid-message); once.
    pub drop_at: Option<String>,
    /// How many more times to close at `drop_at` after the first (0: once).
    pub drop_repeat: usize,
    /// Do not offer XCLIENT.
    pub no_xclient: bool,
    /// Do not offer DSN.
    pub no_dsn: bool,
    /// Do not offer SMTPUTF8.
    pub no_smtputf8: bool,
    /// Never answer after the message (to test timeouts).
    pub hang_at_end: bool,
    /// Do not offer PIPELINING.
    pub no_pipelining: bool,
    /// Offer CHUNKING (BDAT, RFC 3030). With it, `data` is the reply to a BDAT chunk (whose octets are
    /// read and dropped first, as RFC 3030 wants) and `end` the reply to the LAST chunk.
    pub chunking: bool,
    /// After replying to this command ("RCPT", ...), close the connection, once; first send the reply
    /// text that follows the verb, if any (as Postfix sends `421` when its `smtpd_timeout` runs out).
    pub hangup_after: Option<String>,
}

/// One transaction the fake saw end with a positive reply.
#[derive(Clone, Debug, Default)]
pub struct Delivered {
    pub xclient: Option<String>,
    pub helo: String,
    pub mail_from: String,
    pub rcpts: Vec<String>,
    /// The message, unstuffed, CRLF as received (BDAT: the chunks' octets, as received).
    pub data: Vec<u8>,
    /// Whether the message came with BDAT rather than DATA.
    pub bdat: bool,
}

/// A running fake upstream.
#[derive(Clone)]
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub delivered: Arc<Mutex<Vec<Delivered>>>,
    /// Every command line received, across connections.
    pub commands: Arc<Mutex<Vec<String>>>,
    pub connections: Arc<Mutex<usize>>,
    /// Commands that arrived with more input already behind them (the client pipelined them).
    pub pipelined: Arc<Mutex<usize>>,
    script: Arc<Mutex<Script>>,
}

impl FakeUpstream {
    /// Starts on 127.0.0.1 with a free port.
    pub async fn start(script: Script) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeUpstream {
            addr: listener.local_addr().unwrap(),
            delivered: Default::default(),
            commands: Default::default(),
            connections: Default::default(),
            pipelined: Default::default(),
            script: Arc::new(Mutex::new(script)),
        };
        let f = fake.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                *f.connections.lock().unwrap() += 1;
                tokio::spawn(f.clone().session(s));
            }
        });
        fake
    }

    /// Changes the script for later commands.
    pub fn set_script(&self, s: Script) {
        *self.script.lock().unwrap() = s;
    }

    /// Messages delivered so far.
    pub fn messages(&self) -> Vec<Delivered> {
        self.delivered.lock().unwrap().clone()
    }

    /// Waits until `n` messages were delivered (or 5 s).
    pub async fn wait_for(&self, n: usize) -> Vec<Delivered> {
        for _ in 0..500 {
            if self.messages().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.messages()
    }

    async fn session(self, s: TcpStream) {
        let mut io = BufReader::new(s);
        let _ = io.get_mut().write_all(b"220 fake.upstream ESMTP\r\n").await;
        let mut cur = Delivered::default();
        let mut xclient = None;
        let mut line = String::new();
        loop {
            line.clear();
            match io.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let cmd = line.trim_end().to_string();
            self.commands.lock().unwrap().push(cmd.clone());
            if !io.buffer().is_empty() {
                *self.pipelined.lock().unwrap() += 1;
            }
            let script = self.script.lock().unwrap().clone();
            let verb = cmd.split([' ', ':']).next().unwrap_or("").to_ascii_uppercase();
            if script.drop_at.as_deref() == Some(verb.as_str()) {
                // one-shot (or `drop_repeat` + 1 times): the next connection works again
                let mut s = self.script.lock().unwrap();
                match s.drop_repeat {
                    0 => s.drop_at = None,
                    _ => s.drop_repeat -= 1,
                }
                return;
            }
            let reply: String = match verb.as_str() {
                "EHLO" => {
                    cur.helo = cmd[5..].to_string();
                    let x = if script.no_xclient { "" } else { "250-XCLIENT ADDR PORT NAME HELO PROTO LOGIN\r\n" };
                    let dsn = if script.no_dsn { "" } else { "250-DSN\r\n" };
                    let utf8 = if script.no_smtputf8 { "" } else { "250-SMTPUTF8\r\n" };
                    let pipe = if script.no_pipelining { "" } else { "250-PIPELINING\r\n" };
                    let chunking = if script.chunking { "250-CHUNKING\r\n" } else { "" };
                    format!("250-fake.upstream\r\n{x}{pipe}{dsn}{utf8}{chunking}250-SIZE 100000000\r\n250 8BITMIME\r\n")
                }
                "XCLIENT" => {
                    xclient = Some(cmd.clone());
                    "220 fake.upstream ESMTP\r\n".into()
                }
                // Like Postfix: a second MAIL inside an open transaction is refused.
                "MAIL" if !cur.mail_from.is_empty() => "503 5.5.1 Error: nested MAIL command\r\n".into(),
                "MAIL" => match script.mail {
                    Some(r) => format!("{r}\r\n"),
                    None => {
                        cur.mail_from = cmd.clone();
                        cur.rcpts.clear();
                        "250 2.1.0 Ok\r\n".into()
                    }
                },
                "RCPT" => match script.rcpt.filter(|(needle, _)| cmd.contains(needle.as_str())) {
                    Some((_, r)) => format!("{r}\r\n"),
                    None => {
                        cur.rcpts.push(cmd.clone());
                        "250 2.1.5 Ok\r\n".into()
                    }
                },
                "DATA" => {
                    if let Some(r) = script.data {
                        format!("{r}\r\n")
                    } else {
                        let _ = io.get_mut().write_all(b"354 go ahead\r\n").await;
                        let drop_mid = script.drop_at.as_deref() == Some("BODY");
                        if drop_mid {
                            self.script.lock().unwrap().drop_at = None;
                        }
                        let Some(data) = read_data(&mut io, drop_mid).await else {
                            return;
                        };
                        if script.hang_at_end {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        match script.end {
                            Some(r) => {
                                cur.mail_from.clear();
                                format!("{r}\r\n")
                            }
                            None => {
                                cur.data = data;
                                cur.xclient = xclient.clone();
                                self.delivered.lock().unwrap().push(std::mem::take(&mut cur));
                                "250 2.0.0 Ok: queued as FAKE123\r\n".into()
                            }
                        }
                    }
                }
                "BDAT" if script.chunking => {
                    let mut args = cmd.split_ascii_whitespace().skip(1);
                    let size = args.next().and_then(|n| n.parse::<usize>().ok());
                    let last = args.next().is_some_and(|a| a.eq_ignore_ascii_case("LAST"));
                    let Some(size) = size else {
                        let _ = io.get_mut().write_all(b"501 5.5.4 bad BDAT size\r\n").await;
                        return;
                    };
                    let mut chunk = vec![0; size];
                    if io.read_exact(&mut chunk).await.is_err() {
                        return;
                    }
                    if script.hang_at_end && last {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    match (script.data, last, script.end) {
                        // Refused: the transaction stays open (like Postfix after a refused DATA) until RSET.
                        (Some(r), _, _) => {
                            cur.data.clear();
                            format!("{r}\r\n")
                        }
                        (None, false, _) => {
                            cur.data.extend_from_slice(&chunk);
                            format!("250 2.0.0 {size} octets\r\n")
                        }
                        (None, true, Some(r)) => {
                            cur.mail_from.clear();
                            cur.data.clear();
                            format!("{r}\r\n")
                        }
                        (None, true, None) => {
                            cur.data.extend_from_slice(&chunk);
                            cur.bdat = true;
                            cur.xclient = xclient.clone();
                            self.delivered.lock().unwrap().push(std::mem::take(&mut cur));
                            "250 2.0.0 Ok: queued as FAKE123\r\n".into()
                        }
                    }
                }
                "RSET" => {
                    cur.data.clear();
                    cur.mail_from.clear();
                    cur.rcpts.clear();
                    "250 2.0.0 Ok\r\n".into()
                }
                "QUIT" => {
                    let _ = io.get_mut().write_all(b"221 2.0.0 Bye\r\n").await;
                    return;
                }
                _ => "502 5.5.2 Error: command not recognized\r\n".into(),
            };
            if io.get_mut().write_all(reply.as_bytes()).await.is_err() {
                return;
            }
            let hangup = script.hangup_after.as_deref().and_then(|h| {
                let (v, text) = h.split_once(' ').unwrap_or((h, ""));
                v.eq_ignore_ascii_case(&verb).then(|| text.to_string())
            });
            if let Some(text) = hangup {
                // one-shot, like drop_at
                self.script.lock().unwrap().hangup_after = None;
                if !text.is_empty() {
                    let _ = io.get_mut().write_all(format!("{text}\r\n").as_bytes()).await;
                }
                return;
            }
        }
    }
}

/// Reads dot-stuffed data up to `.\r\n`, unstuffing. With `drop_mid`, returns None after the first line.
async fn read_data(io: &mut BufReader<TcpStream>, drop_mid: bool) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if io.read_until(b'\n', &mut line).await.ok()? == 0 {
            return None;
        }
        if drop_mid {
            return None;
        }
        if line == b".\r\n" {
            return Some(data);
        }
        let l = if line.starts_with(b".") { &line[1..] } else { &line[..] };
        data.extend_from_slice(l);
    }
}

/// Reads everything until EOF (for tests that inspect a raw socket).
#[allow(dead_code)]
pub async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut v)).await;
    v
}
