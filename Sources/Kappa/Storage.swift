import Foundation

/// A reference-counted block of raw memory that tensors view.
///
/// Memory comes from ``BufferPool/shared`` and goes back to it when the last tensor viewing
/// it is released, so repeated training steps reuse their intermediates instead of returning
/// to the system allocator (and paying first-touch page faults) for every one.
final class Storage: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer
    let byteCount: Int

    init(byteCount: Int, zeroed: Bool) {
        self.byteCount = byteCount
        self.pointer = BufferPool.shared.allocate(byteCount: byteCount)
        if zeroed { memset(pointer, 0, byteCount) }
    }

    deinit { BufferPool.shared.release(pointer, byteCount: byteCount) }
}

/// A cache of freed tensor buffers, keyed by their (rounded) size.
///
/// Buffers are 64-byte aligned. A freed buffer is kept for reuse while the cache holds less
/// than ``capacity`` bytes; beyond that it goes back to the system. Thread-safe.
public final class BufferPool: @unchecked Sendable {
    /// The pool all tensors allocate from.
    public static let shared = BufferPool()

    private var free: [Int: [UnsafeMutableRawPointer]] = [:]
    private var cachedBytes = 0
    private let lock = NSLock()

    /// The most bytes kept in the cache: by default a quarter of physical memory, at most
    /// 8 GiB (a ref-tiny training step keeps a few GiB of intermediates alive at its peak).
    /// Lowering it releases nothing at once; call ``trim()`` for that.
    public var capacity: Int = Swift.min(8 << 30, Int(ProcessInfo.processInfo.physicalMemory / 4))

    /// Counters for tests and benchmarks: how many requests were served from the cache and
    /// how many went to the system allocator.
    public private(set) var hits = 0
    /// Requests the pool could not serve from a freed buffer (each a fresh allocation).
    public private(set) var misses = 0

    /// Bytes currently held in the cache, not in use by any tensor.
    public var bytesCached: Int { lock.lock(); defer { lock.unlock() }; return cachedBytes }

    static func roundedSize(_ n: Int) -> Int {
        let n = max(n, 64)
        return n <= 65536 ? (n + 63) & ~63 : (n + 4095) & ~4095
    }

    func allocate(byteCount: Int) -> UnsafeMutableRawPointer {
        let size = BufferPool.roundedSize(byteCount)
        lock.lock()
        if var list = free[size], let p = list.popLast() {
            free[size] = list
            cachedBytes -= size
            hits += 1
            lock.unlock()
            return p
        }
        misses += 1
        lock.unlock()
        return UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
    }

    func release(_ p: UnsafeMutableRawPointer, byteCount: Int) {
        let size = BufferPool.roundedSize(byteCount)
        lock.lock()
        if cachedBytes + size <= capacity {
            free[size, default: []].append(p)
            cachedBytes += size
            lock.unlock()
        } else {
            lock.unlock()
            p.deallocate()
        }
    }

    /// Returns every cached buffer to the system.
    public func trim() {
        lock.lock()
        let all = free
        free = [:]
        cachedBytes = 0
        lock.unlock()
        for (_, list) in all { for p in list { p.deallocate() } }
    }
}

/// The process's memory as the kernel reports it, for benchmarks and memory checks.
public enum ProcessMemory {
    /// Resident set size now (VmRSS of /proc/self/status), in bytes; 0 where unavailable.
    public static var residentBytes: Int {
        guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
              let line = s.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return 0 }
        return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
    }

    /// Peak resident set size so far (getrusage), in bytes.
    public static var peakResidentBytes: Int {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return usage.ru_maxrss * 1024
    }
}
