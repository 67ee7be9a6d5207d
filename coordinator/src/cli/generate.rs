//! `strata generate`: a raw completion in one process.

use std::io::Write;

use clap::Args;
use serde::Serialize;
use strata_model::stage::StageOptions;
use strata_model::tokenizer::DecodeStream;
use strata_model::Generator;

use super::{ModelArgs, SamplingArgs};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Tokens to generate at most.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Print one JSON object (prompt tokens, tokens, text) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    pub prompt: String,
}

#[derive(Serialize)]
struct JsonOutput<'a> {
    prompt_tokens: &'a [u32],
    tokens: &'a [u32],
    text: &'a str,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let (file, device) = args.model.open()?;
    let mut generator = Generator::load(&file, &device, StageOptions::default())?;
    let prompt = if args.chat {
        let template = strata_model::ChatTemplate::from_gguf(file.metadata())?;
        let message = strata_model::ChatMessage::new(strata_model::chat_template::Role::User, args.prompt.clone());
        template.render(&[message], true)?
    } else {
        args.prompt.clone()
    };
    let prompt_tokens = generator.tokenizer().encode(&prompt)?;
    let params = args.sampling.params();
    if args.json {
        let generation = generator.generate(&prompt_tokens, args.max_tokens, &params, |_, _| true)?;
        let text = generator.tokenizer().decode(&generation.tokens)?;
        let out = JsonOutput { prompt_tokens: &prompt_tokens, tokens: &generation.tokens, text: &text };
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", args.prompt)?;
    stdout.flush()?;
    let mut stream = DecodeStream::default();
    let mut failure = None;
    generator.generate(&prompt_tokens, args.max_tokens, &params, |tokenizer, token| {
        let piece = tokenizer.decode_next(&mut stream, token).map_err(anyhow::Error::from);
        let written = piece.and_then(|p| Ok(p.map(|text| write!(stdout, "{text}").and_then(|()| stdout.flush())).transpose()?));
        match written {
            Ok(_) => true,
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    })?;
    writeln!(stdout)?;
    failure.map_or(Ok(()), Err)
}
