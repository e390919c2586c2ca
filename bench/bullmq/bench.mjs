// The BullMQ baseline: N no-op jobs through one BullMQ queue on the given Redis, added in
// bulk and processed by one worker with the given concurrency. Prints one JSON line:
// {"jobs": N, "seconds": S, "jobs_per_sec": R}.
//
//   node bench.mjs --redis redis://127.0.0.1:6379 --jobs 20000 --concurrency 64
import { Queue, Worker } from "bullmq";

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
}

const url = new URL(arg("redis", "redis://127.0.0.1:6379"));
const jobs = Number(arg("jobs", "10000"));
const concurrency = Number(arg("concurrency", "64"));
const connection = { host: url.hostname, port: Number(url.port || 6379), maxRetriesPerRequest: null };
const name = "pw-bench";

const queue = new Queue(name, { connection });
await queue.obliterate({ force: true });

let done = 0;
let finish;
const finished = new Promise((resolve) => (finish = resolve));
const worker = new Worker(name, async () => {}, { connection, concurrency, autorun: false });
worker.on("completed", () => {
  done += 1;
  if (done === jobs) finish();
});
worker.on("failed", (job, err) => {
  console.error(`job ${job?.id} failed: ${err}`);
  process.exit(1);
});

const started = process.hrtime.bigint();
worker.run();
const chunk = 1000;
for (let i = 0; i < jobs; i += chunk) {
  const batch = [];
  for (let j = i; j < Math.min(i + chunk, jobs); j++) {
    batch.push({ name: "noop", data: { n: j }, opts: { removeOnComplete: true, removeOnFail: true } });
  }
  await queue.addBulk(batch);
}
await finished;
const seconds = Number(process.hrtime.bigint() - started) / 1e9;
console.log(JSON.stringify({ jobs, seconds, jobs_per_sec: jobs / seconds }));
await worker.close();
await queue.close();
process.exit(0);
