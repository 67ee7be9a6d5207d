//! Python programs the tests run with OpenAI's official client (`crate::python`).

/// Several choices (`n`): three of them, each its own draw, the same three again
/// with the same seed, streamed too (deltas by index), on both routes. Arguments:
/// the API's base URL, a key, the model id.
pub const CHOICES_CLIENT: &str = r#"
import sys, openai
base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)
ask = dict(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=12, temperature=1, n=3, seed=5)
chat = client.chat.completions.create(**ask)
assert [c.index for c in chat.choices] == [0, 1, 2], chat
texts = [c.message.content for c in chat.choices]
assert len(set(texts)) > 1, texts
assert [c.message.content for c in client.chat.completions.create(**ask).choices] == texts
streamed, usage = ["", "", ""], None
for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **ask):
    for c in chunk.choices:
        streamed[c.index] += c.delta.content or ""
    usage = chunk.usage or usage
assert streamed == texts, (streamed, texts)
assert usage.completion_tokens == chat.usage.completion_tokens and usage.prompt_tokens == chat.usage.prompt_tokens, usage
done = client.completions.create(model=model, prompt="hello", max_tokens=8, temperature=1, n=3, seed=5)
assert [c.index for c in done.choices] == [0, 1, 2], done
try:
    client.chat.completions.create(**{**ask, "n": 17})
    sys.exit("n = 17 was accepted")
except openai.BadRequestError as e:
    assert e.param == "n", e
print("choices ok")
"#;
