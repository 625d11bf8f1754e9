/** A small typed event emitter and an async-iterable queue (both with no dependency). */

export type Listener<T> = (value: T) => void;

export class Emitter<M extends object> {
  private readonly listeners = new Map<keyof M, Set<Listener<never>>>();

  /** Call `listener` for every `type`; returns a function that removes it. */
  on<K extends keyof M>(type: K, listener: Listener<M[K]>): () => void {
    let set = this.listeners.get(type);
    if (!set) {
      set = new Set();
      this.listeners.set(type, set);
    }
    set.add(listener as Listener<never>);
    return () => this.off(type, listener);
  }

  off<K extends keyof M>(type: K, listener: Listener<M[K]>): void {
    this.listeners.get(type)?.delete(listener as Listener<never>);
  }

  protected emit<K extends keyof M>(type: K, value: M[K]): void {
    const set = this.listeners.get(type);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        (listener as Listener<M[K]>)(value);
      } catch (e) {
        // a listener's bug must not break the stream: report it like an uncaught error, asynchronously
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

/** Values pushed by a producer, pulled by one `for await`; ends with `end()` or throws with `fail(e)`. */
export class AsyncQueue<T> implements AsyncIterableIterator<T> {
  private readonly items: T[] = [];
  private waiter: { resolve: (r: IteratorResult<T>) => void; reject: (e: unknown) => void } | null = null;
  private done = false;
  private error: unknown = null;
  private readonly onReturn: () => void;

  constructor(onReturn: () => void) {
    this.onReturn = onReturn;
  }

  push(item: T): void {
    if (this.done) return;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve({ value: item, done: false });
    } else {
      this.items.push(item);
    }
  }

  end(error: unknown = null): void {
    if (this.done) return;
    this.done = true;
    this.error = error;
    if (this.waiter && this.items.length === 0) {
      const w = this.waiter;
      this.waiter = null;
      if (error) w.reject(error);
      else w.resolve({ value: undefined, done: true });
    }
  }

  next(): Promise<IteratorResult<T>> {
    const item = this.items.shift();
    if (item !== undefined) return Promise.resolve({ value: item, done: false });
    if (this.done) {
      if (this.error) {
        const e = this.error;
        this.error = null; // thrown once
        return Promise.reject(e);
      }
      return Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
    });
  }

  return(): Promise<IteratorResult<T>> {
    this.items.length = 0;
    this.end();
    this.error = null;
    this.onReturn();
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<T> {
    return this;
  }
}
