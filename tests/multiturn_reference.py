"""For tests of multi-turn rollouts, importable by Ray's workers (unlike a test module): a task that fails on
purpose, and the real rollout actor with a reference way of playing its episodes."""

from __future__ import annotations

from cluster.rollout import VLLMRolloutActor, derive_seed, draw_problems
from textenv import TaskSample, make_env
from textenv.tasks import GuessNumberTask


class GuessOrFailTask(GuessNumberTask):
    """``guess_number``, except that a secret written ``fail`` makes the task raise at its episode's second token:
    a user's task failing in the middle of a rollout, while other episodes are still generating."""

    def stop(self, sample: TaskSample, response: str) -> bool:
        if sample.answer == "fail" and len(response) >= 2:
            raise RuntimeError("GuessOrFailTask failed on purpose")
        return super().stop(sample, response)


class AloneRolloutActor(VLLMRolloutActor):
    """The real rollout actor, plus :meth:`play_alone`: a reference for its multi-turn play."""

    def play_alone(self, num_prompts: int, samples_per_prompt: int, seed: int) -> list[dict]:
        """The episodes ``sample(num_prompts, samples_per_prompt, seed, ...)`` plays, each played alone: turn by turn,
        every turn one ``LLM.generate`` call of a single request seeded ``derive_seed(row seed, turn)``, stepped
        through a fresh environment with Gymnasium's ``step``. Nothing here depends on how a batch is scheduled."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        env = make_env(self.env_cfg, tokenizer=self.tokenizer).unwrapped
        samples, prompts = draw_problems(env, seed, num_prompts)
        R, stops = env.max_response_tokens, [self.tokenizer.eos_token_id, env.turn_end_id]
        episodes = []
        for i in range(num_prompts):
            for j in range(samples_per_prompt):
                env.reset(options={"sample": samples[i]})
                ep: dict = {"tokens": [], "actions": [], "logp": [], "rewards": [], "turn_lengths": []}
                done, info = False, {}
                while not done:
                    params = SamplingParams(max_tokens=R - len(ep["tokens"]), temperature=self.opts.temperature,
                                            logprobs=0, stop_token_ids=stops, detokenize=False,
                                            seed=derive_seed(derive_seed(seed, i, j), len(ep["turn_lengths"])))
                    (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=prompts[i] + ep["tokens"])], params,
                                               use_tqdm=False)
                    turn = out.outputs[0]
                    ep["turn_lengths"].append(len(turn.token_ids))
                    for token, lp in zip(turn.token_ids, turn.logprobs):
                        _, reward, terminated, truncated, info = env.step(int(token))
                        replied = list(info.get("env_tokens", []))
                        ep["tokens"] += [int(token), *replied]
                        ep["actions"] += [1] + [0] * len(replied)
                        ep["logp"] += [lp[token].logprob] + [0.0] * len(replied)
                        ep["rewards"].append(reward)
                        done = terminated or truncated
                        if done:
                            break
                ep["score"] = info["score"]
                episodes.append(ep)
        return episodes
