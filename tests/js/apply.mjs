// Apply presence_state / presence_diff events with the real JavaScript clients' presence code
// and print every client's state after every event, in presence_core's presence_state shape.
//
// Used by tests/test_js_clients.py.  Protocol: JSON lines.  Each stdin line is one request
//
//   {"sequences": [{"topic": "realtime:room", "events": [EVENT, ...]}, ...]}
//   EVENT = {"kind": "state" | "diff", "payload": {...},
//            "frames": {"v1": "<v1 JSON object text>", "v2": "<v2 JSON array text>"}}
//
// ("frames" is optional; without it on every event only the first two clients run) and gets
// one stdout line back
//
//   {"results": [{CLIENT: {"states": [STATE, ...], "error": null | "<message>"}, ...}, ...]}
//   or {"error": "<stack>"} if the request could not run at all
//   STATE = {key: {"metas": [{..., "phx_ref": ref}]}}, the client's state after each event
//
// Each sequence gets fresh clients, so sequences and requests are independent.  The process
// serves requests until stdin closes.  The clients, all of them the packages' own code:
//
//   phoenix        phoenix.js (npm "phoenix"): state = Presence.syncState(state, payload) /
//                  Presence.syncDiff(state, payload), the static functions a Presence
//                  instance calls, starting from {}.  Its state already has our shape; metas
//                  are printed as the client holds them, so a joined meta keeps the
//                  "phx_ref_prev" it arrived with.
//   realtime       @supabase/realtime-js: a RealtimePresence constructed on a stand-in channel
//                  that has only what its presence adapter uses (on / joinRef / trigger) and
//                  hands each payload to the handlers the presence registered.  State is the
//                  public RealtimePresence.state, {key: [{presence_ref, ...meta}]}, mapped
//                  back (presence_ref -> phx_ref).
//   phoenix_v2     (with frames) a whole phoenix.js Socket + Channel + Presence instance over
//                  a stand-in WebSocket (the `transport` option): it connects, joins (the
//                  stand-in answers phx_join with ok) and receives each event's v2 frame as a
//                  text message, decoded by its own serializer.  State is presence.state.
//   realtime_v1,   (with frames) the same for a whole RealtimeClient + RealtimeChannel
//   realtime_v2    (presence enabled) with vsn 1.0.0 (v1 frames) and 2.0.0 (v2 frames).
//                  State is channel.presenceState(), mapped back as for "realtime".
//
// A client that throws gets no further events: its "states" stop there and "error" says why.
//
// What the clients do (phoenix 1.8.16 assets/js/phoenix/presence.js; realtime-js 2.119.1
// src/phoenix/presenceAdapter.ts on @supabase/phoenix 0.4.5, whose presence.js has the same
// code as phoenix's apart from type comments):
//
// * syncDiff applies joins first, then leaves, each in payload key order.  A join for a held
//   key becomes [held metas whose phx_ref is not joining, in held order] + [joining metas in
//   payload order]; a held ref that joins again is replaced and moves to the end.  A leave
//   removes metas by phx_ref and deletes a key left with none; a leave for a key not held is
//   skipped and the later leaves still apply.  The diff is cloned first (not mutated).
// * syncState diffs the new state against the held one by phx_ref only (held refs keep their
//   held meta, new refs are appended, missing ones leave) and then calls syncDiff.  It writes
//   into the entries of the newState it is given (`metas` of a held key becomes just the
//   joining metas), hence the copies below.
// * Metas are kept exactly as received: phoenix.js keeps "phx_ref_prev" on a meta that joined
//   in an update.  realtime-js's state getter returns, from a JSON clone, {key: [presence]}
//   where each presence is the meta with "presence_ref" = phx_ref (a meta's own
//   "presence_ref" field is overwritten) and "phx_ref" and "phx_ref_prev" deleted.  It builds
//   that object with plain assignment, so a presence key "__proto__" is lost there (phoenix.js
//   uses null-prototype objects and keeps it).
// * The Presence instance (used by realtime-js and by phoenix_v2) buffers diffs until it has
//   a presence_state for the channel's current join ref.

import { createInterface } from "node:readline"
import { Presence, Socket } from "phoenix"
import { RealtimeClient, RealtimePresence } from "@supabase/realtime-js"

const DEFAULT_TOPIC = "realtime:room"

// -- states in our shape ---------------------------------------------------------------------

// Objects built here have no prototype, so a presence key or meta field named "__proto__" is
// copied like any other name.  JSON.parse / JSON.stringify treat it as a plain name too.

function snapshot(value) {
  return JSON.parse(JSON.stringify(value))
}

function fromSupabase(state) {
  // {key: [{presence_ref, ...meta}]} -> {key: {metas: [{...meta, phx_ref}]}}
  const result = Object.create(null)
  for (const key of Object.getOwnPropertyNames(state)) {
    result[key] = {
      metas: state[key].map((presence) => {
        const meta = Object.create(null)
        for (const name of Object.getOwnPropertyNames(presence)) {
          if (name !== "presence_ref") meta[name] = presence[name]
        }
        meta.phx_ref = presence.presence_ref
        return meta
      }),
    }
  }
  return snapshot(result)
}

function describe(error) {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error)
}

// -- payload-level clients -------------------------------------------------------------------

class PhoenixStatic {
  constructor() {
    this.state = {}
  }

  apply(event) {
    // A copy: syncState rewrites the entries of the state it is given (for a key already held,
    // `metas` becomes just the joining metas), which would corrupt the event for other clients.
    const payload = structuredClone(event.payload)
    this.state =
      event.kind === "state"
        ? Presence.syncState(this.state, payload)
        : Presence.syncDiff(this.state, payload)
  }

  read() {
    return snapshot(this.state)
  }
}

class StandInChannel {
  // The part of a phoenix Channel that realtime-js's presence uses: `on` (the presence
  // registers its presence_state / presence_diff handlers), `joinRef` (it buffers diffs until
  // it holds a state for the current join) and `trigger` (it emits its own join / leave / sync
  // events to the channel's listeners through it; there are none here).
  constructor() {
    this.bindings = []
  }

  on(event, callback) {
    this.bindings.push({ event, callback })
    return this.bindings.length
  }

  joinRef() {
    return "1"
  }

  trigger(event, payload) {
    for (const binding of this.bindings) {
      if (binding.event === event) binding.callback(payload, null, this.joinRef())
    }
  }
}

class RealtimeStandIn {
  constructor() {
    this.channel = new StandInChannel()
    this.presence = new RealtimePresence({ channelAdapter: { getChannel: () => this.channel } })
  }

  apply(event) {
    const name = event.kind === "state" ? "presence_state" : "presence_diff"
    this.channel.trigger(name, structuredClone(event.payload))
  }

  read() {
    return fromSupabase(this.presence.state)
  }
}

// -- whole clients over a stand-in WebSocket -------------------------------------------------

class StandInWebSocket {
  // Enough of the WebSocket API for phoenix's Socket: it opens on the next turn of the event
  // loop and answers every phx_join with an ok reply; `deliver` hands the client a text frame.
  static CONNECTING = 0
  static OPEN = 1
  static CLOSING = 2
  static CLOSED = 3
  static last = null

  constructor(url) {
    this.url = url
    this.readyState = StandInWebSocket.CONNECTING
    this.binaryType = "arraybuffer"
    this.v1 = new URL(url).searchParams.get("vsn") === "1.0.0"
    StandInWebSocket.last = this
    setImmediate(() => {
      this.readyState = StandInWebSocket.OPEN
      this.onopen?.({ type: "open" })
    })
  }

  send(data) {
    const msg = this.v1 ? JSON.parse(data) : fromV2(JSON.parse(data))
    if (msg.event !== "phx_join") return
    const payload = { status: "ok", response: { postgres_changes: [] } }
    const reply = this.v1
      ? { join_ref: msg.join_ref, ref: msg.ref, topic: msg.topic, event: "phx_reply", payload }
      : [msg.join_ref, msg.ref, msg.topic, "phx_reply", payload]
    setImmediate(() => this.deliver(JSON.stringify(reply)))
  }

  deliver(text) {
    this.onmessage?.({ data: text })
  }

  close(code, reason) {
    if (this.readyState === StandInWebSocket.CLOSED) return
    this.readyState = StandInWebSocket.CLOSED
    setImmediate(() => this.onclose?.({ code: code ?? 1000, reason: reason ?? "", wasClean: true }))
  }
}

function fromV2([join_ref, ref, topic, event, payload]) {
  return { join_ref, ref, topic, event, payload }
}

function subTopic(topic) {
  if (!topic.startsWith("realtime:")) {
    throw new Error(`topic must start with "realtime:", got ${JSON.stringify(topic)}`)
  }
  return topic.slice("realtime:".length)
}

class PhoenixWire {
  constructor(topic) {
    this.topic = topic
    this.frame = "v2"
  }

  async open() {
    this.socket = new Socket("ws://presence-core.invalid/socket", {
      transport: StandInWebSocket,
      heartbeatIntervalMs: 3_600_000,
    })
    this.socket.connect()
    this.channel = this.socket.channel(this.topic)
    this.presence = new Presence(this.channel)
    await new Promise((resolve, reject) => {
      this.channel
        .join()
        .receive("ok", resolve)
        .receive("error", (reason) => reject(new Error(`join error ${JSON.stringify(reason)}`)))
        .receive("timeout", () => reject(new Error("join timeout")))
    })
    this.ws = StandInWebSocket.last
  }

  apply(event) {
    this.ws.deliver(event.frames[this.frame])
  }

  read() {
    return snapshot(this.presence.state)
  }

  close() {
    this.socket?.disconnect()
  }
}

class RealtimeWire {
  constructor(topic, vsn) {
    this.topic = topic
    this.vsn = vsn
    this.frame = vsn === "1.0.0" ? "v1" : "v2"
  }

  async open() {
    this.client = new RealtimeClient("ws://presence-core.invalid/realtime/v1", {
      params: { apikey: "test" },
      transport: StandInWebSocket,
      vsn: this.vsn,
      heartbeatIntervalMs: 3_600_000,
    })
    this.channel = this.client.channel(subTopic(this.topic), {
      config: { presence: { enabled: true } },
    })
    await new Promise((resolve, reject) => {
      this.channel.subscribe((status, error) => {
        if (status === "SUBSCRIBED") resolve()
        else reject(new Error(`subscribe: ${status} ${error ?? ""}`))
      })
    })
    this.ws = StandInWebSocket.last
    if (this.channel.topic !== this.topic) {
      throw new Error(`channel topic ${this.channel.topic} is not ${this.topic}`)
    }
  }

  apply(event) {
    this.ws.deliver(event.frames[this.frame])
  }

  read() {
    return fromSupabase(this.channel.presenceState())
  }

  close() {
    // Tear down without waiting for phx_leave replies the stand-in never sends.
    if (this.client === undefined) return
    for (const channel of this.client.getChannels()) channel.teardown()
    void this.client.disconnect()
  }
}

// -- driving ---------------------------------------------------------------------------------

async function run(sequence) {
  const topic = sequence.topic ?? DEFAULT_TOPIC
  const events = sequence.events
  const clients = { phoenix: new PhoenixStatic(), realtime: new RealtimeStandIn() }
  const wired = []
  try {
    if (events.length > 0 && events.every((event) => event.frames)) {
      for (const [name, client] of [
        ["phoenix_v2", new PhoenixWire(topic)],
        ["realtime_v1", new RealtimeWire(topic, "1.0.0")],
        ["realtime_v2", new RealtimeWire(topic, "2.0.0")],
      ]) {
        wired.push(client)
        await client.open()
        clients[name] = client
      }
    }
    const result = {}
    for (const [name, client] of Object.entries(clients)) {
      const states = []
      let error = null
      for (const [index, event] of events.entries()) {
        try {
          client.apply(event)
          states.push(client.read())
        } catch (thrown) {
          error = `event ${index} (${event.kind}): ${describe(thrown)}`
          break
        }
      }
      result[name] = { states, error }
    }
    return result
  } finally {
    for (const client of wired) client.close()
  }
}

async function main() {
  const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })
  for await (const line of lines) {
    if (line.trim() === "") continue
    let response
    try {
      const request = JSON.parse(line)
      const results = []
      for (const sequence of request.sequences) results.push(await run(sequence))
      response = { results }
    } catch (error) {
      // A request that could not run at all (bad input, a client that would not connect).
      response = { error: error instanceof Error ? error.stack : String(error) }
    }
    process.stdout.write(JSON.stringify(response) + "\n")
  }
  // Closed sockets leave library timers behind (reconnect / disconnect timeouts): exit once
  // stdout has been written instead of waiting for them.
  process.stdout.write("", () => process.exit(0))
}

await main()
