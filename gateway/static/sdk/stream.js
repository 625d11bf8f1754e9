/** A small typed event emitter and an async-iterable queue (both with no dependency). */
export class Emitter {
    listeners = new Map();
    /** Call `listener` for every `type`; returns a function that removes it. */
    on(type, listener) {
        let set = this.listeners.get(type);
        if (!set) {
            set = new Set();
            this.listeners.set(type, set);
        }
        set.add(listener);
        return () => this.off(type, listener);
    }
    off(type, listener) {
        this.listeners.get(type)?.delete(listener);
    }
    emit(type, value) {
        const set = this.listeners.get(type);
        if (!set)
            return;
        for (const listener of [...set]) {
            try {
                listener(value);
            }
            catch (e) {
                // a listener's bug must not break the stream: report it like an uncaught error, asynchronously
                queueMicrotask(() => {
                    throw e;
                });
            }
        }
    }
}
/** Values pushed by a producer, pulled by one `for await`; ends with `end()` or throws with `fail(e)`. */
export class AsyncQueue {
    items = [];
    waiter = null;
    done = false;
    error = null;
    onReturn;
    constructor(onReturn) {
        this.onReturn = onReturn;
    }
    push(item) {
        if (this.done)
            return;
        if (this.waiter) {
            const w = this.waiter;
            this.waiter = null;
            w.resolve({ value: item, done: false });
        }
        else {
            this.items.push(item);
        }
    }
    end(error = null) {
        if (this.done)
            return;
        this.done = true;
        this.error = error;
        if (this.waiter && this.items.length === 0) {
            const w = this.waiter;
            this.waiter = null;
            if (error)
                w.reject(error);
            else
                w.resolve({ value: undefined, done: true });
        }
    }
    next() {
        const item = this.items.shift();
        if (item !== undefined)
            return Promise.resolve({ value: item, done: false });
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
    return() {
        this.items.length = 0;
        this.end();
        this.error = null;
        this.onReturn();
        return Promise.resolve({ value: undefined, done: true });
    }
    [Symbol.asyncIterator]() {
        return this;
    }
}
