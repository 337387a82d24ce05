"""Anchor templates written natively in other languages: hard requests of several kinds, and everyday asks.

The logs are English, so the only other-language text the model learns from is anchors. If a language
appears only in easy anchors, the model learns "this language means easy" and sends a proof or a
logic puzzle written in it to the cheapest tier. So every language here has hard requests as well as
simple asks: puzzles whose answer needs a proof, system designs under constraints, hard code,
constrained writing, expert (medical) analysis; German also a derivation.

Slots, filled by `native_values`: {n}, {lines}, {age}, {a}, {b}, {algorithm}, {lang}, {clang} (a
language with threads and a memory model), {thing_fr}, {system_phys_de}, and per language {system_xx},
{topic_xx}, {symptoms_xx}.
"""

from __future__ import annotations

import random

NATIVE_HARD_KINDS: dict[str, list[str]] = {
    "fr": [
        "{n} prisonniers seront interrogés un par un dans une pièce qui contient une seule ampoule. Trouvez une "
        "stratégie qui permet à l'un d'eux d'annoncer avec certitude que tous sont passés, et prouvez qu'elle "
        "termine.",
        "Concevez {system_fr} qui tolère la panne d'une région entière sans perte de données, avec une latence p99 "
        "inférieure à 30 ms. Donnez le modèle de données, le protocole de cohérence, les estimations de capacité "
        "et justifiez chaque compromis.",
        "Implémentez l'algorithme de {algorithm} en {lang} avec la meilleure complexité connue, prouvez la borne "
        "et traitez tous les cas limites.",
        "Écrivez un poème de {lines} vers sur {topic_fr} dont chaque vers commence par la lettre suivante de "
        "l'alphabet, sans jamais répéter un mot, puis vérifiez la contrainte vers par vers.",
        "Un patient de {age} ans présente {symptoms_fr}. Établissez un diagnostic différentiel hiérarchisé, "
        "indiquez les examens à demander et expliquez comment chaque résultat modifie la prise en charge.",
        "Écrivez en {clang} {thing_fr} sans verrou sur le chemin de lecture, sûre en accès concurrent, et "
        "démontrez qu'elle est linéarisable.",
    ],
    "de": [
        "{n} Gefangene bekommen je einen roten oder blauen Hut, sehen nur die Hüte der anderen und müssen "
        "gleichzeitig die Farbe ihres eigenen Huts raten. Finde eine Strategie, die möglichst viele sicher "
        "rettet, und beweise, dass keine Strategie mehr garantieren kann.",
        "Entwirf {system_de} mit strikter Serialisierbarkeit, Datenhaltung pro Land nach DSGVO und "
        "unterbrechungsfreien Schemamigrationen. Begründe das Datenmodell, das Konsistenzprotokoll und die "
        "Kapazitätsplanung.",
        "Implementiere den Algorithmus von {algorithm} in {lang} mit der besten bekannten Laufzeit, beweise die "
        "Schranke und behandle alle Randfälle.",
        "Schreibe ein Gedicht mit {lines} Zeilen über {topic_de}, in dem jede Zeile mit dem nächsten Buchstaben "
        "des Alphabets beginnt und kein Wort zweimal vorkommt, und weise die Bedingung Zeile für Zeile nach.",
        "Ein {age}-jähriger Patient hat {symptoms_de}. Erstelle eine nach Wahrscheinlichkeit geordnete "
        "Differenzialdiagnose, nenne die nächsten Untersuchungen und erkläre, wie jedes Ergebnis die Therapie "
        "ändert.",
        "Leite die Zustandssumme {system_phys_de} von Grund auf her, nenne jede Näherung und schätze den Fehler "
        "ab, den sie verursacht.",
    ],
    "es": [
        "Dos jugadores retiran por turnos 1, 3 o 4 fichas de un montón de {n} fichas; gana quien retira la "
        "última. Caracteriza todas las posiciones perdedoras y demuéstralo por inducción.",
        "Diseña {system_es} con procesamiento exactamente una vez, un millón de escrituras por segundo en el pico "
        "y registros de auditoría inalterables. Explica el modelo de datos, el protocolo de consistencia y qué "
        "falla primero bajo carga.",
        "Implementa el algoritmo de {algorithm} en {lang} con la mejor complejidad asintótica conocida, "
        "demuestra la cota y cubre todos los casos límite.",
        "Escribe un soneto sobre {topic_es} en endecasílabos con rima consonante ABBA ABBA CDC DCD y marca los "
        "acentos de cada verso.",
        "Un paciente de {age} años presenta {symptoms_es}. Da un diagnóstico diferencial ordenado, di qué "
        "pruebas pedir a continuación y explica cómo cambia el tratamiento según cada resultado.",
        "Encuentra y corrige la condición de carrera de un singleton con doble comprobación en {clang}, "
        "explicando las reglas del modelo de memoria que lo justifican.",
    ],
    "it": [
        "Su un'isola vivono cavalieri, che dicono sempre il vero, e furfanti, che mentono sempre. {n} abitanti "
        "seduti in cerchio dicono ciascuno: «entrambi i miei vicini sono furfanti». Determina tutti i numeri "
        "possibili di furfanti e dimostralo.",
        "Progetta {system_it} con latenza p99 sotto i 20 ms in più regioni, isolamento multi-tenant e "
        "aggiornamenti senza interruzioni. Descrivi il modello dei dati, il protocollo di consistenza e le stime "
        "di capacità, giustificando ogni compromesso.",
        "Implementa l'algoritmo di {algorithm} in {lang} con la migliore complessità asintotica nota, dimostra "
        "il limite superiore e gestisci tutti i casi limite.",
        "Scrivi un racconto di esattamente {n} parole {topic_it} senza mai usare la lettera «a», e indica il "
        "numero di parole di ogni frase.",
        "Un paziente di {age} anni presenta {symptoms_it}. Formula una diagnosi differenziale ordinata, indica "
        "gli esami successivi e spiega come ogni risultato cambia la terapia.",
    ],
    "pt": [
        "{n} pessoas precisam atravessar uma ponte à noite com uma única lanterna; a ponte aguenta no máximo "
        "duas pessoas por vez, que andam no ritmo da mais lenta, e cada pessoa tem o seu tempo de travessia. "
        "Dê um algoritmo para o tempo total mínimo e prove que ele é ótimo.",
        "Projete {system_pt} sem perda de dados se uma região inteira cair, com consistência forte e orçamento de "
        "40 servidores. Explique o modelo de dados, o protocolo de consenso e as estimativas de capacidade.",
        "Implemente o algoritmo de {algorithm} em {lang} com a melhor complexidade conhecida, prove o limite e "
        "trate todos os casos extremos.",
        "Escreva uma sextilha sobre {topic_pt} em que cada verso seja um palíndromo de palavras, e justifique a "
        "métrica de cada verso.",
        "Um paciente de {age} anos apresenta {symptoms_pt}. Dê um diagnóstico diferencial hierarquizado, "
        "indique os próximos exames e explique como cada resultado muda a conduta.",
    ],
    "ru": [
        "{n} мудрецов стоят в колонне, на каждом белый или чёрный колпак; каждый видит колпаки всех впереди "
        "стоящих. Найдите стратегию, при которой ошибётся не более одного, и докажите, что лучше нельзя.",
        "Спроектируйте {system_ru} с обработкой ровно один раз, задержкой p99 менее 20 мс и сохранностью данных "
        "при отказе целого региона. Опишите модель данных, протокол согласованности и оценку мощностей.",
        "Реализуйте алгоритм {algorithm} на {lang} с наилучшей известной асимптотикой, докажите оценку и "
        "обработайте все граничные случаи.",
        "Напишите стихотворение из {lines} строк на тему «{topic_ru}», где каждая строка начинается со следующей "
        "буквы алфавита и ни одно слово не повторяется, и проверьте условие построчно.",
        "Пациент (возраст {age}): {symptoms_ru}. Составьте ранжированный дифференциальный диагноз, план "
        "обследования и объясните, как каждый результат меняет лечение.",
    ],
    "zh": [
        "{n}个囚犯排成一列，每人戴黑帽或白帽，每人都能看到前面所有人的帽子。请设计一个策略使最多只有一人猜错，"
        "并证明不存在更好的策略。",
        "请设计{system_zh}，要求跨区域p99延迟低于20毫秒、整个区域故障时不丢数据、支持不停机的模式迁移。"
        "给出数据模型、一致性协议和容量估算，并论证每个权衡。",
        "用{lang}实现{algorithm}算法，达到已知最优的渐近复杂度，证明复杂度上界并处理所有边界情况。",
        "写一首关于{topic_zh}的七言律诗，严格遵守平仄和对仗，并逐句说明格律。",
        "一名{age}岁患者出现{symptoms_zh}。请给出按可能性排序的鉴别诊断、下一步检查以及每种结果如何改变治疗方案。",
    ],
    "ja": [
        "{n}人の囚人が一列に並び、それぞれ白か黒の帽子をかぶっている。各自は自分より前に並ぶ全員の帽子が見える"
        "（自分の帽子は見えない）。間違える人を高々一人にする戦略を示し、それが最適であることを証明せよ。",
        "{system_ja}を設計してください。要件は、複数リージョンでp99レイテンシ20ミリ秒以下、リージョン全体の障害でも"
        "データを失わないこと、無停止のスキーマ移行です。データモデル、一貫性プロトコル、容量見積もりを示し、"
        "各トレードオフを論証してください。",
        "{algorithm}のアルゴリズムを{lang}で既知の最良の計算量で実装し、その上界を証明し、すべての境界ケースを"
        "扱ってください。",
        "{topic_ja}を題材に、五七五七七を厳密に守った短歌を十首詠み、各首の音数を示してください。",
        "{age}歳の患者に{symptoms_ja}がみられる。可能性の高い順に鑑別診断を挙げ、次の検査と各結果で治療方針が"
        "どう変わるかを説明せよ。",
    ],
    "ko": [
        "{n}명의 죄수가 한 줄로 서서 각자 흰 모자나 검은 모자를 쓰고 앞에 선 모든 사람의 모자를 볼 수 있다. "
        "최대 한 명만 틀리는 전략을 제시하고 그것이 최적임을 증명하라.",
        "{algorithm} 알고리즘을 {lang}(으)로 알려진 최선의 시간 복잡도로 구현하고, "
        "그 상한을 증명하며 모든 경계 조건을 처리하라.",
        "{system_ko}을(를) 설계하라. p99 지연 20ms 이하, 리전 전체 장애 시에도 데이터 손실 없음, "
        "무중단 스키마 변경이 요구된다. 데이터 모델, 일관성 프로토콜, 용량 추정을 제시하고 각 절충을 정당화하라.",
        "{age}세 환자가 {symptoms_ko} 증상을 보인다. 가능성 순으로 감별 진단을 제시하고, "
        "다음 검사와 각 결과에 따라 치료가 어떻게 달라지는지 설명하라.",
    ],
    "tr": [
        "{n} mahkûm bir sıraya diziliyor; her birinin başında beyaz ya da siyah bir şapka var ve yalnızca "
        "öndekilerin şapkalarını görüyorlar. En fazla bir kişinin yanılacağı bir strateji bulun ve bunun en iyi "
        "olduğunu kanıtlayın.",
        "{algorithm} algoritmasını {lang} ile bilinen en iyi karmaşıklıkta gerçekleştirin, üst sınırı kanıtlayın ve "
        "tüm uç durumları ele alın.",
        "{age} yaşında bir hastada {symptoms_tr} var. Olasılık sırasına göre ayırıcı tanıyı, sonraki tetkikleri ve "
        "her sonucun tedaviyi nasıl değiştirdiğini açıklayın.",
    ],
    "ar": [
        "أثبت أن عدد الأعداد الأولية لا نهائي، ثم أثبت أن مجموع مقلوباتها متباعد، مع ذكر كل مبرهنة تستخدمها.",
        "صمّم {system_ar} يتحمّل تعطّل منطقة كاملة دون فقدان أي بيانات، مع زمن استجابة أقل من 20 ملّي ثانية. "
        "اشرح نموذج البيانات وبروتوكول الاتساق وتقدير السعة، وبرّر كل مفاضلة.",
        "نفّذ خوارزمية {algorithm} بلغة {lang} بأفضل تعقيد معروف، وأثبت الحدّ الأعلى، وعالج جميع الحالات الحدّية.",
    ],
    "hi": [
        "सिद्ध कीजिए कि अभाज्य संख्याएँ अनंत हैं और उनके व्युत्क्रमों का योग अपसारी है; हर प्रमेय का उल्लेख कीजिए।",
        "{system_hi} का डिज़ाइन बनाइए जो पूरे क्षेत्र के बंद होने पर भी कोई डेटा न खोए और जिसकी p99 विलंबता 20 "
        "मिलीसेकंड से कम हो। डेटा मॉडल, संगति प्रोटोकॉल और क्षमता का अनुमान बताइए और हर समझौते का औचित्य दीजिए।",
        "{algorithm} एल्गोरिद्म को {lang} में सर्वोत्तम ज्ञात जटिलता के साथ लागू कीजिए, सीमा सिद्ध कीजिए और सभी "
        "सीमांत स्थितियाँ सँभालिए।",
    ],
    "sv": [
        "Bevisa att det finns oändligt många primtal på formen 4k+3, och ange varje sats du använder.",
        "Implementera {algorithm}s algoritm i {lang} med bästa kända tidskomplexitet, bevisa gränsen och hantera "
        "alla kantfall.",
    ],
    "nl": [
        "Bewijs dat elk eindig integriteitsdomein een lichaam is, en noem elke stelling die je gebruikt.",
        "Implementeer het algoritme van {algorithm} in {lang} met de best bekende complexiteit, bewijs de grens "
        "en behandel alle randgevallen.",
    ],
    "pl": [
        "Udowodnij, że każda grupa rzędu p^2 jest abelowa, podając każde twierdzenie, z którego korzystasz.",
        "Zaimplementuj algorytm {algorithm} w języku {lang} z najlepszą znaną złożonością, udowodnij "
        "ograniczenie i obsłuż wszystkie przypadki brzegowe.",
    ],
}

NATIVE_EASY_MORE: list[str] = [
    "안녕하세요! 오늘 날씨 어때요?", "프랑스의 수도는 어디예요?", "{a} 더하기 {b} 하면 얼마예요?",
    "'감사합니다'를 영어로 어떻게 말해요?", "Merhaba, nasılsın?", "Türkiye'nin başkenti neresi?",
    "{a} artı {b} kaç eder?", "'Teşekkür ederim' İngilizcede nasıl denir?",
    "مرحبا، كيف حالك؟", "ما هي عاصمة فرنسا؟", "كم يساوي {a} زائد {b}؟",
    "नमस्ते, आप कैसे हैं?", "भारत की राजधानी क्या है?", "{a} और {b} का जोड़ कितना है?",
    "Hej! Hur mår du?", "Vad är huvudstaden i Norge?", "Hallo, hoe gaat het?", "Wat is de hoofdstad van België?",
    "Cześć, co słychać?", "Jaka jest stolica Polski?",
    "Écris un petit mot pour remercier ma voisine pour les fleurs.", "Écris un message d'anniversaire d'une ligne.",
    "Schreib eine kurze Nachricht, dass ich zehn Minuten später komme.", "Schreib einen Satz zum Geburtstag.",
    "Escribe un mensaje corto de cumpleaños para mi hermana.", "Escribe una nota breve para dar las gracias.",
    "Scrivi un breve messaggio di auguri per un collega.", "Escreva uma mensagem curta de parabéns.",
    "今日は何曜日ですか？", "日本の首都はどこですか？", "你好，今天天气怎么样？", "中国的首都是哪里？",
    "Привет! Как дела?", "Какая столица у Испании?", "Сколько будет {a} плюс {b}?",
]

# Proper names, so that they read the same in every language.
_ALGORITHMS = ["Dinic", "Hopcroft-Karp", "Aho-Corasick", "Ukkonen", "Edmonds", "Tarjan"]
_LANGUAGES = ["Python", "Java", "C++", "Go", "Rust", "Kotlin", "C#", "TypeScript"]
# Lock-free structures and memory-model races only make sense where threads share memory.
_CONCURRENT_LANGUAGES = ["Java", "C++", "Go", "Rust", "Kotlin", "C#"]
_THINGS_FR = ["une file d'attente", "une table de hachage", "une liste à enjambements", "une pile"]
_SYSTEMS = {
    "fr": ["un registre de paiements distribué mondialement", "un moteur d'appariement d'ordres boursiers",
           "un éditeur de texte collaboratif en temps réel"],
    "de": ["ein global verteiltes Zahlungs-Hauptbuch", "eine Matching-Engine für eine Börse",
           "einen kollaborativen Texteditor in Echtzeit"],
    "es": ["un libro mayor de pagos distribuido globalmente", "un motor de emparejamiento de órdenes bursátiles",
           "un servicio de notificaciones para 500 millones de usuarios"],
    "it": ["un registro dei pagamenti distribuito globalmente", "un motore di abbinamento degli ordini di borsa",
           "un backend per giochi multigiocatore in tempo reale"],
    "pt": ["um livro-razão de pagamentos distribuído globalmente", "um sistema de despacho de corridas",
           "uma plataforma de streaming de vídeo"],
    "ru": ["глобально распределённый платёжный реестр", "движок сопоставления заявок для биржи",
           "сервис уведомлений на 500 миллионов пользователей"],
    "zh": ["一个全球分布式支付账本", "一个证券交易所撮合引擎", "一个实时多人协作文本编辑器"],
    "ja": ["グローバルに分散した決済台帳", "証券取引所のマッチングエンジン", "リアルタイム共同編集エディタ"],
    "ko": ["전 세계에 분산된 결제 원장", "증권 거래소 매칭 엔진", "실시간 공동 편집기"],
    "ar": ["نظام دفع موزّع عالميًا", "محرّك مطابقة لأوامر البورصة"],
    "hi": ["विश्व स्तर पर वितरित भुगतान प्रणाली", "शेयर बाज़ार के ऑर्डर मिलाने वाले इंजन"],
}
_TOPICS = {
    "fr": ["la mer", "l'insomnie", "une horloge cassée"],
    "de": ["das Meer", "die Schlaflosigkeit", "den ersten Schnee"],
    "es": ["el mar", "el insomnio", "un reloj roto"], "it": ["sul mare", "sull'insonnia", "sulla prima neve"],
    "pt": ["o mar", "a insônia", "a primeira neve"], "ru": ["море", "бессонница", "первый снег"],
    "zh": ["秋夜", "故乡", "初雪"], "ja": ["初雪", "故郷", "秋の夜"],
}
_SYMPTOMS = {
    "fr": ["de la fièvre, un nouveau souffle cardiaque et des hémorragies sous-unguéales en flammèches",
           "une faiblesse progressive, un ptosis qui s'aggrave le soir et une masse thymique"],
    "de": ["Fieber, ein neues Herzgeräusch und Splitterblutungen",
           "Polyurie, Gewichtsverlust und einen normalen Nüchternblutzucker"],
    "es": ["fiebre, un soplo cardíaco nuevo y hemorragias en astilla",
           "debilidad progresiva, ptosis que empeora por la tarde y una masa tímica"],
    "it": ["febbre, un nuovo soffio cardiaco ed emorragie subungueali a scheggia",
           "poliuria, calo di peso e glicemia a digiuno normale"],
    "pt": ["febre, um sopro cardíaco novo e hemorragias em estilhaço",
           "fraqueza progressiva, ptose que piora à noite e uma massa tímica"],
    "ru": ["лихорадка, новый шум в сердце и подногтевые кровоизлияния",
           "полиурия, потеря веса и нормальная глюкоза натощак"],
    "zh": ["发热、新出现的心脏杂音和甲下线状出血", "进行性肌无力、傍晚加重的眼睑下垂和胸腺肿块"],
    "ja": ["発熱、新たな心雑音、爪下線状出血", "進行性の筋力低下、夕方に悪化する眼瞼下垂、胸腺腫瘤"],
    "ko": ["발열, 새로 생긴 심잡음, 손톱 밑 선상 출혈", "진행성 근력 약화, 저녁에 심해지는 안검하수, 흉선 종괴"],
    "tr": ["ateş, yeni bir kalp üfürümü ve tırnak altı kıymık kanamaları",
           "ilerleyici kas güçsüzlüğü, akşamları artan göz kapağı düşüklüğü ve timus kitlesi"],
}
_PHYSICS_DE = ["eines zweidimensionalen Ising-Modells auf dem Quadratgitter",
               "einer eindimensionalen zweiatomigen Kette", "eines Teilchens im endlichen Potentialtopf"]


def native_values(rng: random.Random) -> dict[str, object]:
    """Random fillers for every slot of the templates above."""
    values: dict[str, object] = {
        "n": rng.choice([7, 10, 12, 20, 100]), "lines": rng.randint(8, 14), "age": rng.randint(19, 80),
        "a": rng.randint(2, 99), "b": rng.randint(1, 20), "algorithm": rng.choice(_ALGORITHMS),
        "lang": rng.choice(_LANGUAGES), "clang": rng.choice(_CONCURRENT_LANGUAGES),
        "thing_fr": rng.choice(_THINGS_FR), "system_phys_de": rng.choice(_PHYSICS_DE),
    }
    for slot, table in (("system", _SYSTEMS), ("topic", _TOPICS), ("symptoms", _SYMPTOMS)):
        for language, options in table.items():
            values[f"{slot}_{language}"] = rng.choice(options)
    return values
