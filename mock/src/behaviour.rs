//! What the mock does with a request: how fast it answers, how long the answer
//! is, and which fault (if any) it injects. Pure, so the fault draw is testable.

use serde::{Deserialize, Serialize};

/// Run-time knobs; every field can be changed through `POST /admin/config`
/// with a JSON object holding any subset of them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Behaviour {
    /// Delay before the response header (non-streamed: before the whole answer).
    pub ttft_ms: u64,
    /// Delay between streamed tokens.
    pub inter_token_ms: u64,
    /// Tokens in each answer, unless the request's `max_tokens` is smaller.
    pub output_tokens: u32,
    /// Share of requests answered with a 500.
    pub error_500_ratio: f64,
    /// Share of requests answered with a 429 and `Retry-After`.
    pub error_429_ratio: f64,
    /// Share of requests answered "overloaded": Anthropic's 529
    /// `overloaded_error`; a 503 from the OpenAI-shaped APIs, as OpenAI
    /// answers when its servers are overloaded.
    pub overloaded_ratio: f64,
    /// Share of streamed requests that are overloaded after the answer
    /// began: Anthropic's API answers 200, `message_start`, then an
    /// `overloaded_error` event (as Anthropic does under load); the
    /// OpenAI-shaped APIs answer a 503 as for `overloaded_ratio`.
    pub overloaded_mid_stream_ratio: f64,
    pub retry_after_s: u32,
    /// Share of requests that never get an answer (the connection stays open).
    pub hang_ratio: f64,
    /// Share of streamed requests whose connection is dropped half way.
    pub drop_mid_stream_ratio: f64,
    /// Streamed answers send this many tokens, then nothing more while the
    /// connection stays open: a provider stalled mid-stream, for the
    /// proxy's inter-token timeout. `None`: never.
    pub stall_after_tokens: Option<u32>,
    /// Prompt tokens reported as served from the provider's prompt cache
    /// (`prompt_tokens_details.cached_tokens`, at most the prompt).
    pub cached_tokens: u32,
    /// Prompt tokens reported as written to the provider's prompt cache
    /// (Anthropic's `cache_creation_input_tokens`, at most the prompt not
    /// read from the cache; the OpenAI-shaped APIs report none, as OpenAI
    /// does).
    pub cache_write_tokens: u32,
    /// Hidden reasoning tokens, reported in
    /// `completion_tokens_details.reasoning_tokens` and, as OpenAI does,
    /// included in `completion_tokens`.
    pub reasoning_tokens: u32,
    /// How streamed events end their lines: `lf` (what OpenAI sends),
    /// `crlf` or `cr`, all valid server-sent events.
    pub sse_line_ending: LineEnding,
    /// Send a comment event (`: keep-alive`) before every token, as
    /// providers do to keep idle connections open.
    pub sse_keep_alive: bool,
    /// Send each token's event in two writes a moment apart, cut inside
    /// its first line ending (between CR and LF) or its data line.
    pub sse_split_events: bool,
}

/// The API the mock speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Api {
    /// OpenAI's: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
    /// `Authorization: Bearer`.
    #[default]
    OpenAi,
    /// Azure OpenAI's: `/openai/deployments/{deployment}/...?api-version=`,
    /// the `api-key` header, the deployment as the answer's model.
    Azure,
    /// Anthropic's Messages API: `/v1/messages`, `x-api-key`,
    /// `anthropic-version`.
    Anthropic,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Azure => "azure",
            Api::Anthropic => "anthropic",
        }
    }
}

impl std::str::FromStr for Api {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "openai" => Ok(Api::OpenAi),
            "azure" => Ok(Api::Azure),
            "anthropic" => Ok(Api::Anthropic),
            other => Err(format!(
                "api must be openai, azure or anthropic, not {other:?}"
            )),
        }
    }
}

/// The line ending of streamed events.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LineEnding {
    #[default]
    Lf,
    Crlf,
    Cr,
}

impl LineEnding {
    pub fn as_str(self) -> &'static str {
        match self {
            LineEnding::Lf => "\n",
            LineEnding::Crlf => "\r\n",
            LineEnding::Cr => "\r",
        }
    }

    /// An event of one `data` line ended this way.
    pub fn event(self, data: &str) -> String {
        let eol = self.as_str();
        format!("data: {data}{eol}{eol}")
    }

    /// A comment event.
    pub fn comment(self, text: &str) -> String {
        let eol = self.as_str();
        format!(": {text}{eol}{eol}")
    }
}

impl std::str::FromStr for LineEnding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lf" => Ok(LineEnding::Lf),
            "crlf" => Ok(LineEnding::Crlf),
            "cr" => Ok(LineEnding::Cr),
            other => Err(format!("line ending must be lf, crlf or cr, not {other:?}")),
        }
    }
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            ttft_ms: 0,
            inter_token_ms: 0,
            output_tokens: 16,
            error_500_ratio: 0.0,
            error_429_ratio: 0.0,
            overloaded_ratio: 0.0,
            overloaded_mid_stream_ratio: 0.0,
            retry_after_s: 1,
            hang_ratio: 0.0,
            drop_mid_stream_ratio: 0.0,
            stall_after_tokens: None,
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            sse_line_ending: LineEnding::Lf,
            sse_keep_alive: false,
            sse_split_events: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    Error500,
    Error429,
    Overloaded,
    OverloadedMidStream,
    Hang,
    DropMidStream,
}

impl Behaviour {
    /// Picks the fault for one request from a uniform draw in `[0, 1)`; the
    /// shares are stacked in a fixed order so they add up as configured.
    pub fn fault(&self, draw: f64, streamed: bool) -> Fault {
        let mut edge = self.error_500_ratio;
        if draw < edge {
            return Fault::Error500;
        }
        edge += self.error_429_ratio;
        if draw < edge {
            return Fault::Error429;
        }
        edge += self.overloaded_ratio;
        if draw < edge {
            return Fault::Overloaded;
        }
        edge += self.overloaded_mid_stream_ratio;
        if streamed && draw < edge {
            return Fault::OverloadedMidStream;
        }
        edge += self.hang_ratio;
        if draw < edge {
            return Fault::Hang;
        }
        edge += self.drop_mid_stream_ratio;
        if streamed && draw < edge {
            return Fault::DropMidStream;
        }
        Fault::None
    }

    pub fn validate(&self) -> Result<(), String> {
        let shares = [
            ("error_500_ratio", self.error_500_ratio),
            ("error_429_ratio", self.error_429_ratio),
            ("overloaded_ratio", self.overloaded_ratio),
            (
                "overloaded_mid_stream_ratio",
                self.overloaded_mid_stream_ratio,
            ),
            ("hang_ratio", self.hang_ratio),
            ("drop_mid_stream_ratio", self.drop_mid_stream_ratio),
        ];
        for (name, v) in shares {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be within [0, 1], got {v}"));
            }
        }
        let total: f64 = shares.iter().map(|(_, v)| v).sum();
        if total > 1.0 + 1e-9 {
            return Err(format!("fault shares add up to {total}, more than 1"));
        }
        Ok(())
    }
}

/// The answer's text: `n` words naming the mock and the position, so answers
/// from different mocks differ and truncation is visible.
pub fn answer_tokens(name: &str, n: u32) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i == 0 {
                format!("{name}:{i}")
            } else {
                format!(" {name}:{i}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_stack_in_order() {
        let b = Behaviour {
            error_500_ratio: 0.1,
            error_429_ratio: 0.2,
            overloaded_ratio: 0.05,
            hang_ratio: 0.3,
            drop_mid_stream_ratio: 0.1,
            ..Behaviour::default()
        };
        assert_eq!(b.fault(0.05, true), Fault::Error500);
        assert_eq!(b.fault(0.15, true), Fault::Error429);
        assert_eq!(b.fault(0.32, true), Fault::Overloaded);
        assert_eq!(b.fault(0.45, true), Fault::Hang);
        assert_eq!(b.fault(0.68, true), Fault::DropMidStream);
        assert_eq!(b.fault(0.68, false), Fault::None);
        assert_eq!(b.fault(0.95, true), Fault::None);
    }

    #[test]
    fn shares_over_one_are_refused() {
        let b = Behaviour {
            error_500_ratio: 0.7,
            hang_ratio: 0.7,
            ..Behaviour::default()
        };
        assert!(b.validate().is_err());
        assert!(Behaviour::default().validate().is_ok());
    }
}
