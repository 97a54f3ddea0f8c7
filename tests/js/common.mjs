// What the Node drivers of the tests share: the JSON-lines output, bounded commands, and
// phoenix.js pushes as promises.  Importing it also reports every uncaught error as an event,
// so a library throwing from a timer or a socket callback is never a silent death.

export const COMMAND_TIMEOUT_MS = 5_000
const REF_FIELDS = new Set(["phx_ref", "phx_ref_prev", "presence_ref"])

export function emit(message) {
  process.stdout.write(JSON.stringify(message) + "\n")
}

export function describe(error) {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error)
}

process.on("uncaughtException", (error) => {
  emit({ type: "error", where: "uncaught", error: describe(error) })
})
process.on("unhandledRejection", (error) => {
  emit({ type: "error", where: "unhandled", error: describe(error) })
})

// A meta without the refs the clients add (phx_ref, phx_ref_prev, presence_ref).
export function stripRefs(meta) {
  const out = {}
  for (const [name, value] of Object.entries(meta)) if (!REF_FIELDS.has(name)) out[name] = value
  return out
}

export function withTimeout(promise, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    const error = new Error(`${what}: no answer in ${COMMAND_TIMEOUT_MS} ms`)
    timer = setTimeout(() => reject(error), COMMAND_TIMEOUT_MS)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

// realtime-js: the first status a channel's subscribe reports, as [status ("ok" for
// SUBSCRIBED), reason]; every status, with its error turned into a reason by reasonOf, also
// goes to onStatus.
export function subscribed(channel, reasonOf, onStatus) {
  return new Promise((resolve) => {
    let settled = false
    channel.subscribe((status, error) => {
      const reason = error ? reasonOf(error) : null
      onStatus(status, reason)
      if (settled) return
      settled = true
      resolve([status === "SUBSCRIBED" ? "ok" : status, reason])
    })
  })
}

// realtime-js: leave a channel and drop it from its client, as [status, null].
export async function unsubscribed(channel) {
  const status = await channel.unsubscribe(COMMAND_TIMEOUT_MS)
  channel.teardown()
  return [status, null]
}

// A phoenix.js push as a promise of its reply: [status, response].
export function reply(push) {
  return new Promise((resolve) => {
    push
      .receive("ok", (response) => resolve(["ok", response]))
      .receive("error", (response) => resolve(["error", response]))
      .receive("timeout", () => resolve(["timeout", null]))
  })
}
