// Several real clients carrying JWTs, in one Node process, driven by JSON lines.
//
// Used by tests/test_auth_clients.py.  Unlike live_client.mjs (one client per process, a fixed
// apikey), each client here is opened by name with its own token, so one process holds every
// JavaScript client of a scenario.  Run with a global WebSocket (Node 20):
//
//   node --experimental-websocket auth_client.mjs
//
// stdin: one command per line; "id" (any JSON value) is echoed in the reply.
//
//   {"id": 1, "cmd": "open", "name": "alice", "kind": "realtime", "base": "ws://127.0.0.1:4000",
//    "apikey": JWT}                   realtime-js: new RealtimeClient(BASE/realtime/v1,
//                                     {params: {apikey}}) (an absent apikey is passed as absent)
//   {"id": 2, "cmd": "open", "name": "bob", "kind": "phoenix", "base": ..., "token": JWT}
//                                     phoenix.js: new Socket(BASE/socket, {params: {token}}),
//                                     connected at once (no "token": no params)
//   {"id": 3, "cmd": "auth", "name": "alice", "token": JWT}      realtime-js setAuth(token)
//   {"id": 4, "cmd": "join", "name": ..., "topic": "realtime:room", "key": "", "private": false}
//   {"id": 5, "cmd": "track", "name": ..., "meta": {...}}
//   {"id": 6, "cmd": "state", "name": ...}
//   {"id": 7, "cmd": "leave", "name": ...}
//   {"id": 8, "cmd": "close", "name": ...}
//   {"id": 9, "cmd": "exit"}
//
// A join first leaves the client's previous channel (a refused one keeps rejoining).  Its reply
// is the first outcome the client reports: realtime-js's subscribe callback status ("ok" for
// SUBSCRIBED; CHANNEL_ERROR with its Error's message, TIMED_OUT, CLOSED), phoenix.js's join push
// ("ok", "error" with the reply's response, "timeout") or its channel's onError
// ("channel_error").  Every command is bounded (COMMAND_TIMEOUT_MS).
//
// stdout: one JSON object per line, each with a "type"; "t" is the wall clock in seconds.
//
//   {"type": "started"}
//   {"type": "reply", "id", "cmd", "name", "status", "response", "state", "channel_state"}
//   {"type": "sync", "name", "state": STATE}                every presence sync
//   {"type": "channel", "name", "status", "error", "t"}     every subscribe callback (realtime-js),
//                                                           channel onError / onClose (phoenix.js)
//   {"type": "system", "name", "payload", "t"}              every `system` message
//   {"type": "socket", "name", "status": "open" | "error" | "close", "code", "reason",
//    "message", "t"}                                         phoenix.js onOpen/onError/onClose
//   {"type": "error", "where", "error"}                     anything that threw
//
//   STATE = {key: [meta, ...]}, metas without their refs.

import { createInterface } from "node:readline"
import { Presence, Socket } from "phoenix"
import { RealtimeClient } from "@supabase/realtime-js"
import {
  COMMAND_TIMEOUT_MS,
  describe,
  emit,
  reply,
  stripRefs,
  subscribed,
  unsubscribed,
  withTimeout,
} from "./common.mjs"

const HEARTBEAT_MS = 1_000
const RECONNECT_MS = 2_000

const now = () => Date.now() / 1000

// A close or error event (an Event, a CloseEvent, an Error) as JSON.
function eventInfo(event) {
  if (event === undefined || event === null) return {}
  const out = {}
  if (typeof event.code === "number") out.code = event.code
  if (typeof event.reason === "string") out.reason = event.reason
  if (typeof event.message === "string") out.message = event.message
  if (typeof event.type === "string") out.event = event.type
  return out
}

// -- phoenix.js ------------------------------------------------------------------------------

class PhoenixClient {
  constructor(name, base, token) {
    this.name = name
    const params = token === undefined || token === null ? {} : { token }
    this.socket = new Socket(`${base}/socket`, {
      params,
      heartbeatIntervalMs: HEARTBEAT_MS,
      timeout: COMMAND_TIMEOUT_MS,
      reconnectAfterMs: () => RECONNECT_MS,
    })
    this.socket.onOpen(() => emit({ type: "socket", name, status: "open", t: now() }))
    this.socket.onError((error) => {
      emit({ type: "socket", name, status: "error", ...eventInfo(error), t: now() })
    })
    this.socket.onClose((event) => {
      emit({ type: "socket", name, status: "close", ...eventInfo(event), t: now() })
    })
    this.socket.connect()
    this.channel = null
    this.presence = null
  }

  async join({ topic, key = "", private: isPrivate = false }) {
    await this.leave()
    const name = this.name
    const config = { presence: { key, enabled: true }, broadcast: { self: false, ack: false } }
    if (isPrivate) config.private = true
    const channel = this.socket.channel(topic, { config })
    this.channel = channel
    this.presence = new Presence(channel)
    this.presence.onSync(() => emit({ type: "sync", name, state: this.state() }))
    channel.on("system", (payload) => emit({ type: "system", name, payload, t: now() }))
    return new Promise((resolve) => {
      let settled = false
      const settle = (outcome) => {
        if (!settled) {
          settled = true
          resolve(outcome)
        }
      }
      channel.onError((reason) => {
        emit({ type: "channel", name, status: "error", error: eventInfo(reason), t: now() })
        settle(["channel_error", eventInfo(reason)])
      })
      channel.onClose(() => emit({ type: "channel", name, status: "close", t: now() }))
      reply(channel.join(COMMAND_TIMEOUT_MS)).then(settle)
    })
  }

  track(meta) {
    const body = { type: "presence", event: "track", payload: meta }
    return reply(this._joined().push("presence", body))
  }

  async leave() {
    if (this.channel === null) return ["ok", null]
    const channel = this.channel
    this.channel = null
    const outcome = await reply(channel.leave(COMMAND_TIMEOUT_MS))
    channel.teardown?.()
    return outcome
  }

  channelState() {
    return this.channel?.state ?? null
  }

  state() {
    const out = {}
    if (!this.presence) return out
    this.presence.list((key, { metas }) => {
      out[key] = metas.map(stripRefs)
    })
    return out
  }

  async close() {
    if (this.channel !== null) this.channel.rejoinTimer?.reset()
    this.socket.disconnect()
  }

  _joined() {
    if (this.channel === null) throw new Error("not joined")
    return this.channel
  }
}

// -- Supabase realtime-js --------------------------------------------------------------------

class SupabaseClient {
  constructor(name, base, apikey) {
    this.name = name
    const params = apikey === undefined || apikey === null ? {} : { apikey }
    this.client = new RealtimeClient(`${base}/realtime/v1`, {
      params,
      heartbeatIntervalMs: HEARTBEAT_MS,
      timeout: COMMAND_TIMEOUT_MS,
      reconnectAfterMs: () => RECONNECT_MS,
    })
    this.channel = null
  }

  async auth(token) {
    await this.client.setAuth(token)
    return ["ok", null]
  }

  async join({ topic, key = "", private: isPrivate = false }) {
    await this.leave()
    const name = this.name
    if (!topic.startsWith("realtime:")) {
      throw new Error(`topic must start with "realtime:": ${topic}`)
    }
    const config = { presence: { key, enabled: true }, broadcast: { self: false, ack: false } }
    if (isPrivate) config.private = true
    const channel = this.client.channel(topic.slice("realtime:".length), { config })
    this.channel = channel
    channel.on("presence", { event: "sync" }, () => {
      emit({ type: "sync", name, state: this.state() })
    })
    channel.on("system", {}, (payload) => emit({ type: "system", name, payload, t: now() }))
    // The reason as the server wrote it (the tests compare it): the Error's message alone.
    return subscribed(
      channel,
      (error) => error.message,
      (status, reason) => emit({ type: "channel", name, status, error: reason, t: now() }),
    )
  }

  async track(meta) {
    return [await this._joined().track(meta), null]
  }

  async leave() {
    if (this.channel === null) return ["ok", null]
    const channel = this.channel
    this.channel = null
    return unsubscribed(channel)
  }

  channelState() {
    return this.channel?.state ?? null
  }

  state() {
    const out = {}
    if (!this.channel) return out
    for (const [key, presences] of Object.entries(this.channel.presenceState())) {
      out[key] = presences.map(stripRefs)
    }
    return out
  }

  async close() {
    for (const channel of this.client.getChannels()) channel.teardown()
    // A refused handshake leaves Node's WebSocket CONNECTING for good (it fires no close), and
    // disconnect() would poll it for 1.5 s: nothing to wait for there.
    if (this.client.connectionState() === "connecting") void this.client.disconnect()
    else await this.client.disconnect()
  }

  _joined() {
    if (this.channel === null) throw new Error("not joined")
    return this.channel
  }
}

// -- driving ---------------------------------------------------------------------------------

const clients = new Map()

function client(name) {
  const found = clients.get(name)
  if (found === undefined) throw new Error(`no client named ${JSON.stringify(name)}`)
  return found
}

async function run(command) {
  switch (command.cmd) {
    case "open": {
      if (clients.has(command.name)) throw new Error(`${command.name} is already open`)
      let made
      const { name, base } = command
      if (command.kind === "phoenix") made = new PhoenixClient(name, base, command.token)
      else if (command.kind === "realtime") made = new SupabaseClient(name, base, command.apikey)
      else throw new Error(`unknown kind ${JSON.stringify(command.kind)}`)
      clients.set(command.name, made)
      return ["ok", null]
    }
    case "auth":
      return client(command.name).auth(command.token)
    case "join":
      return client(command.name).join(command)
    case "track":
      return client(command.name).track(command.meta ?? {})
    case "leave":
      return client(command.name).leave()
    case "state":
      return ["ok", null]
    case "close": {
      const found = client(command.name)
      clients.delete(command.name)
      await found.close()
      return ["ok", null]
    }
    default:
      throw new Error(`unknown command ${JSON.stringify(command.cmd)}`)
  }
}

async function closeAll() {
  const closing = [...clients].map(async ([name, found]) => {
    try {
      await withTimeout(found.close(), `close ${name}`)
    } catch (error) {
      emit({ type: "error", where: `close ${name}`, error: describe(error) })
    }
  })
  clients.clear()
  await Promise.all(closing)
}

async function main() {
  if (typeof WebSocket === "undefined") {
    const error = "no global WebSocket: run node with --experimental-websocket"
    emit({ type: "error", where: "start", error })
    process.stdout.write("", () => process.exit(2))
    return
  }
  emit({ type: "started" })
  const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })
  for await (const line of lines) {
    if (line.trim() === "") continue
    let command = {}
    try {
      command = JSON.parse(line)
      if (command.cmd === "exit") break
      const [status, response] = await withTimeout(run(command), command.cmd)
      const out = { type: "reply", id: command.id ?? null, cmd: command.cmd }
      out.name = command.name ?? null
      out.status = status
      out.response = response ?? null
      if (command.cmd === "state") {
        const found = client(command.name)
        out.state = found.state()
        out.channel_state = found.channelState()
      }
      emit(out)
    } catch (error) {
      const out = { type: "reply", id: command.id ?? null, cmd: command.cmd ?? null }
      emit({ ...out, name: command.name ?? null, status: "error", error: describe(error) })
    }
  }
  await closeAll()
  // Closed sockets leave library timers behind: exit once stdout is written.
  process.stdout.write("", () => process.exit(0))
}

await main()
